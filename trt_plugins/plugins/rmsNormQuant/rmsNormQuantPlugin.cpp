// RMSNormQuant: Y = Q(rmsnorm(X) * weight, scale) (docs/quantization.md 4.1). README.md lists the tensors.
#include "rmsNormQuantPlugin.h"

#include "common/launch.h"

namespace qmamba {

OpInfo const& RMSNormQuantPlugin::info() {
  static OpInfo const i{"RMSNormQuant",
                        {{"eps", PluginFieldType::kFLOAT32, 0.0, 1.0, true},
                         {"scale", PluginFieldType::kFLOAT32, 0.0, 1e30, true}}};
  return i;
}

IPluginV3* RMSNormQuantPlugin::clone() noexcept { return cloneAs(*this); }

bool RMSNormQuantPlugin::typeAllowed(int32_t pos, DataType t, DynamicPluginTensorDesc const*) const noexcept {
  return pos < 2 ? t == DataType::kFLOAT : t == DataType::kINT8;
}

bool RMSNormQuantPlugin::outputShapes(DimsExprs const* in, DimsExprs* out, IExprBuilder&) const noexcept {
  if (in[0].nbDims != 3 || in[1].nbDims != 1) return false;
  out[0] = in[0];
  return true;
}

bool RMSNormQuantPlugin::checkShapes(Dims const* in, Dims const* out, std::string& why) const noexcept {
  if (!rankIs(in[0], 3) || !rankIs(in[1], 1) || !rankIs(out[0], 3)) {
    why = "X and Y must be [B, L, d_model] and weight [d_model], got X " + dimsStr(in[0]) + ", weight " +
          dimsStr(in[1]);
    return false;
  }
  if (!dimOk(in[1].d[0], in[0].d[2])) {
    why = "weight " + dimsStr(in[1]) + " does not match d_model of X " + dimsStr(in[0]);
    return false;
  }
  return true;
}

int32_t RMSNormQuantPlugin::enqueue(PluginTensorDesc const* inDesc, PluginTensorDesc const*, void const* const* inputs,
                                    void* const* outputs, void*, cudaStream_t stream) noexcept {
  std::string why;
  if (launchRMSNormQuant(inDesc, inputs, outputs, fieldF(kEps), fieldF(kScale), stream, why) != QM_OK)
    return fail("enqueue: " + why);
  return 0;
}

}  // namespace qmamba
