#include "common/launch.h"

namespace qmamba {
int launchRMSNormQuant(PluginTensorDesc const* in, void const* const* inputs, void* const* outputs, float eps,
                       float scale, cudaStream_t stream, std::string& why) noexcept {
  Dims const& x = in[0].dims;  // [B, L, d_model]
  int rc = qm_rmsnorm_quant(static_cast<float const*>(inputs[0]), static_cast<float const*>(inputs[1]),
                            static_cast<int8_t*>(outputs[0]), x.d[0] * x.d[1], static_cast<int>(x.d[2]), eps,
                            scale, stream);
  if (rc != QM_OK) why = kernelError(rc);
  return rc;
}
}  // namespace qmamba
