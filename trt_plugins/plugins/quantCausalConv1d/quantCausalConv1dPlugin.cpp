// QuantCausalConv1d: int8 depthwise causal conv + bias + SiLU + requantization, single or dual scale, with the
// conv state in and out (docs/quantization.md 4.3, 4.5). README.md lists the tensors.
#include "quantCausalConv1dPlugin.h"

#include "common/launch.h"

namespace qmamba {

OpInfo const& QuantCausalConv1dPlugin::info() {
  static OpInfo const i{"QuantCausalConv1d",
                        {{"in_scale", PluginFieldType::kFLOAT32, 0.0, 1e30, true},
                         {"out_scale", PluginFieldType::kFLOAT32, 0.0, 1e30, true},
                         {"outlier_scale", PluginFieldType::kFLOAT32, 0.0, 1e30, false},
                         {"dual_scale", PluginFieldType::kINT32, 0, 1, false},
                         {"kernel_size", PluginFieldType::kINT32, 2, 8, false}}};
  return i;
}

bool QuantCausalConv1dPlugin::checkFields(std::vector<double> const& v, std::string& why) noexcept {
  if (v[kDualScale] == 1 && v[kOutlierScale] <= 0) {
    why = "QuantCausalConv1d: dual_scale=1 needs outlier_scale > 0";
    return false;
  }
  return true;
}

IPluginV3* QuantCausalConv1dPlugin::clone() noexcept { return cloneAs(*this); }

bool QuantCausalConv1dPlugin::typeAllowed(int32_t pos, DataType t, DynamicPluginTensorDesc const*) const noexcept {
  switch (pos) {
    case 0: case 1: case 4: return t == DataType::kINT8;  // X, weight, conv_state
    case 2: case 3: return t == DataType::kFLOAT;          // weight_scale, bias
    default: return t == outputType(pos - 5, nullptr);
  }
}

DataType QuantCausalConv1dPlugin::outputType(int32_t index, DataType const*) const noexcept {
  return (dual() && index == 1) ? DataType::kUINT8 : DataType::kINT8;
}

bool QuantCausalConv1dPlugin::outputShapes(DimsExprs const* in, DimsExprs* out, IExprBuilder&) const noexcept {
  if (in[0].nbDims != 3 || in[4].nbDims != 3) return false;
  out[0] = in[0];
  if (dual()) out[1] = in[0];
  out[nbOutputs() - 1] = in[4];
  return true;
}

bool QuantCausalConv1dPlugin::checkShapes(Dims const* in, Dims const* out, std::string& why) const noexcept {
  Dims const &x = in[0], &w = in[1], &ws = in[2], &bias = in[3], &st = in[4];
  const int64_t k = fieldI(kKernelSize);
  bool ok = rankIs(x, 3) && rankIs(w, 2) && rankIs(ws, 1) && rankIs(bias, 1) && rankIs(st, 3);
  ok = ok && dimOk(w.d[0], x.d[2]) && dimOk(w.d[1], k) && dimOk(ws.d[0], x.d[2]) && dimOk(bias.d[0], x.d[2]) &&
       dimOk(st.d[0], x.d[0]) && dimOk(st.d[1], x.d[2]) && dimOk(st.d[2], k - 1);
  for (int32_t i = 0; ok && i < nbOutputs(); ++i) ok = rankIs(out[i], 3);
  if (!ok)
    why = "expected X [B, L, D], weight [D, " + std::to_string(k) + "], weight_scale [D], bias [D], conv_state [B, D, " +
          std::to_string(k - 1) + "]; got X " + dimsStr(x) + ", weight " + dimsStr(w) + ", weight_scale " +
          dimsStr(ws) + ", bias " + dimsStr(bias) + ", conv_state " + dimsStr(st);
  return ok;
}

int32_t QuantCausalConv1dPlugin::enqueue(PluginTensorDesc const* inDesc, PluginTensorDesc const*,
                                         void const* const* inputs, void* const* outputs, void*,
                                         cudaStream_t stream) noexcept {
  ConvFields f{fieldF(kInScale), fieldF(kOutScale), fieldF(kOutlierScale), fieldI(kDualScale), fieldI(kKernelSize)};
  std::string why;
  if (launchQuantCausalConv1d(inDesc, inputs, outputs, f, stream, why) != QM_OK) return fail("enqueue: " + why);
  return 0;
}

}  // namespace qmamba
