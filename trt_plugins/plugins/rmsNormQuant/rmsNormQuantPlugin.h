#pragma once
#include "common/qmambaPlugin.h"

namespace qmamba {
class RMSNormQuantPlugin final : public PluginBase {
 public:
  enum Field { kEps, kScale };
  static OpInfo const& info();
  static bool checkFields(std::vector<double> const&, std::string&) noexcept { return true; }
  explicit RMSNormQuantPlugin(std::vector<double> values) : PluginBase(info(), std::move(values)) {}
  IPluginV3* clone() noexcept override;
  int32_t nbInputs() const noexcept override { return 2; }
  int32_t nbOutputs() const noexcept override { return 1; }
  bool typeAllowed(int32_t pos, DataType t, DynamicPluginTensorDesc const* inOut) const noexcept override;
  DataType outputType(int32_t, DataType const*) const noexcept override { return DataType::kINT8; }
  bool outputShapes(DimsExprs const* in, DimsExprs* out, IExprBuilder& eb) const noexcept override;
  bool checkShapes(Dims const* in, Dims const* out, std::string& why) const noexcept override;
  int32_t enqueue(PluginTensorDesc const* inDesc, PluginTensorDesc const* outDesc, void const* const* inputs,
                  void* const* outputs, void* workspace, cudaStream_t stream) noexcept override;
};
}  // namespace qmamba
