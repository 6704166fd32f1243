// Base of the three scan plugins (DualScaleSelectiveScan, SelectiveStateUpdate, SelectiveScan): they differ
// in input types (int8 codes + scales, or float32), the optional outlier mask, and L = 1 for decode.
#pragma once
#include "qmambaPlugin.h"

namespace qmamba {

class ScanPlugin : public PluginBase {
 public:
  // Field order of the int8 scans (the float scan has y_dtype only).
  enum Field { kUScale, kUOutlierScale, kDtScale, kBScale, kCScale, kZScale, kDualScale, kYDtype };
  static std::vector<FieldSpec> int8Fields();
  // cross-field rules: y_dtype is 1 or 10; dual_scale=1 needs u_outlier_scale > 0
  static bool checkScanFields(char const* op, bool int8Inputs, std::vector<double> const& v, std::string& why) noexcept;

  ScanPlugin(OpInfo const& info, std::vector<double> values, bool int8Inputs, bool decode)
      : PluginBase(info, std::move(values)), mInt8(int8Inputs), mDecode(decode) {}
  int32_t nbInputs() const noexcept override { return 9 + (dual() ? 1 : 0); }
  int32_t nbOutputs() const noexcept override { return 2; }
  bool typeAllowed(int32_t pos, DataType t, DynamicPluginTensorDesc const* inOut) const noexcept override;
  DataType outputType(int32_t index, DataType const*) const noexcept override;
  bool outputShapes(DimsExprs const* in, DimsExprs* out, IExprBuilder& eb) const noexcept override;
  bool checkShapes(Dims const* in, Dims const* out, std::string& why) const noexcept override;
  size_t getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbInputs, DynamicPluginTensorDesc const* outputs,
                          int32_t nbOutputs) const noexcept override;
  int32_t enqueue(PluginTensorDesc const* inDesc, PluginTensorDesc const* outDesc, void const* const* inputs,
                  void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;

 protected:
  bool dual() const noexcept { return mInt8 && fieldI(kDualScale) == 1; }
  int32_t yDtype() const noexcept { return mInt8 ? fieldI(kYDtype) : fieldI(0); }
  bool mInt8, mDecode;
};

}  // namespace qmamba
