#pragma once
#include "common/qmambaPlugin.h"

namespace qmamba {
class QuantCausalConv1dPlugin final : public PluginBase {
 public:
  enum Field { kInScale, kOutScale, kOutlierScale, kDualScale, kKernelSize };
  static OpInfo const& info();
  static bool checkFields(std::vector<double> const& v, std::string& why) noexcept;
  explicit QuantCausalConv1dPlugin(std::vector<double> values) : PluginBase(info(), std::move(values)) {}
  IPluginV3* clone() noexcept override;
  int32_t nbInputs() const noexcept override { return 5; }
  int32_t nbOutputs() const noexcept override { return dual() ? 3 : 2; }
  bool typeAllowed(int32_t pos, DataType t, DynamicPluginTensorDesc const* inOut) const noexcept override;
  DataType outputType(int32_t index, DataType const*) const noexcept override;
  bool outputShapes(DimsExprs const* in, DimsExprs* out, IExprBuilder& eb) const noexcept override;
  bool checkShapes(Dims const* in, Dims const* out, std::string& why) const noexcept override;
  int32_t enqueue(PluginTensorDesc const* inDesc, PluginTensorDesc const* outDesc, void const* const* inputs,
                  void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;

 private:
  bool dual() const noexcept { return fieldI(kDualScale) == 1; }
};
}  // namespace qmamba
