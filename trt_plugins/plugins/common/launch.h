// Kernel launches of the plugins: each turns the plugin's tensors and fields into one call of the C ABI in
// trt_plugins/kernels/qmamba_kernels.h. They return a qm_status; on failure `why` holds qm_last_error().
#pragma once

#include <NvInferRuntime.h>

#include <string>

#include "qmamba_kernels.h"

namespace qmamba {

using nvinfer1::Dims;
using nvinfer1::PluginTensorDesc;

int launchRMSNormQuant(PluginTensorDesc const* in, void const* const* inputs, void* const* outputs, float eps,
                       float scale, cudaStream_t stream, std::string& why) noexcept;

struct ConvFields {
  float inScale, outScale, outlierScale;
  int dualScale, kernelSize;
};
int launchQuantCausalConv1d(PluginTensorDesc const* in, void const* const* inputs, void* const* outputs,
                            ConvFields const& f, cudaStream_t stream, std::string& why) noexcept;

// The three scan ops: int8 inputs (dual or single scale; prefill or decode) or float32 inputs.
struct ScanFields {
  bool int8Inputs, decode;
  int dualScale, yDtype;  // yDtype: ONNX code, 1 = float32, 10 = float16
  float uScale, uOutlierScale, dtScale, BScale, CScale, zScale;
};
int launchScan(PluginTensorDesc const* in, PluginTensorDesc const* out, void const* const* inputs,
               void* const* outputs, void* workspace, ScanFields const& f, cudaStream_t stream,
               std::string& why) noexcept;

int launchHadamardQuant(PluginTensorDesc const* in, void const* const* inputs, void* const* outputs, float scale,
                        cudaStream_t stream, std::string& why) noexcept;

// status -> "<status>: <last error>"
std::string kernelError(int status);

}  // namespace qmamba
