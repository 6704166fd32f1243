// The plugin library's entry points for TensorRT's dynamic-plugin ABI (trtexec --dynamicPlugins,
// IPluginRegistry::loadLibrary): getCreators and setLoggerFinder, exported with C linkage.
#include "dualScaleSelectiveScan/dualScaleSelectiveScanPlugin.h"
#include "hadamardQuant/hadamardQuantPlugin.h"
#include "quantCausalConv1d/quantCausalConv1dPlugin.h"
#include "rmsNormQuant/rmsNormQuantPlugin.h"
#include "selectiveScan/selectiveScanPlugin.h"
#include "selectiveStateUpdate/selectiveStateUpdatePlugin.h"

#define QM_EXPORT extern "C" __attribute__((visibility("default")))

namespace qmamba {
IPluginCreatorInterface* const* allCreators(int32_t& count) noexcept {
  static OpCreator<RMSNormQuantPlugin> rms;
  static OpCreator<QuantCausalConv1dPlugin> conv;
  static OpCreator<DualScaleSelectiveScanPlugin> scan;
  static OpCreator<SelectiveScanPlugin> floatScan;
  static OpCreator<SelectiveStateUpdatePlugin> update;
  static OpCreator<HadamardQuantPlugin> hadamard;
  static IPluginCreatorInterface* const creators[] = {&rms, &conv, &scan, &floatScan, &update, &hadamard};
  count = static_cast<int32_t>(sizeof(creators) / sizeof(creators[0]));
  return creators;
}
}  // namespace qmamba

QM_EXPORT nvinfer1::IPluginCreatorInterface* const* getCreators(int32_t& nbCreators) {
  return qmamba::allCreators(nbCreators);
}

QM_EXPORT void setLoggerFinder(nvinfer1::ILoggerFinder* finder) { qmamba::setLoggerFinder(finder); }
