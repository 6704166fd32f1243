#include "common/launch.h"

namespace qmamba {
int launchHadamardQuant(PluginTensorDesc const* in, void const* const* inputs, void* const* outputs, float scale,
                        cudaStream_t stream, std::string& why) noexcept {
  Dims const& x = in[0].dims;  // [B, L, D]
  const int dtype = in[0].type == nvinfer1::DataType::kHALF ? QM_DTYPE_FLOAT16 : QM_DTYPE_FLOAT32;
  int rc = qm_hadamard_quant(inputs[0], dtype, static_cast<int8_t*>(outputs[0]), x.d[0] * x.d[1],
                             static_cast<int>(x.d[2]), scale, stream);
  if (rc != QM_OK) why = kernelError(rc);
  return rc;
}
}  // namespace qmamba
