#include "common/launch.h"

namespace qmamba {
int launchQuantCausalConv1d(PluginTensorDesc const* in, void const* const* inputs, void* const* outputs,
                            ConvFields const& f, cudaStream_t stream, std::string& why) noexcept {
  Dims const& x = in[0].dims;  // [B, L, D]
  void* mask = f.dualScale ? outputs[1] : nullptr;
  void* stateOut = outputs[f.dualScale ? 2 : 1];
  int rc = qm_quant_causal_conv1d(static_cast<int8_t const*>(inputs[0]), static_cast<int8_t const*>(inputs[1]),
                                  static_cast<float const*>(inputs[2]), static_cast<float const*>(inputs[3]),
                                  static_cast<int8_t const*>(inputs[4]), static_cast<int8_t*>(outputs[0]),
                                  static_cast<uint8_t*>(mask), static_cast<int8_t*>(stateOut),
                                  static_cast<int>(x.d[0]), static_cast<int>(x.d[1]), static_cast<int>(x.d[2]),
                                  f.kernelSize, f.inScale, f.outScale, f.outlierScale, f.dualScale,
                                  /*early_state=*/0, stream);  // the kernel before ours may write it
  if (rc != QM_OK) why = kernelError(rc);
  return rc;
}
}  // namespace qmamba
