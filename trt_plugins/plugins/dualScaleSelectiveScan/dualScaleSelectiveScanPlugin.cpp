#include "dualScaleSelectiveScanPlugin.h"

namespace qmamba {
OpInfo const& DualScaleSelectiveScanPlugin::info() {
  static OpInfo const i{"DualScaleSelectiveScan", ScanPlugin::int8Fields()};
  return i;
}

IPluginV3* DualScaleSelectiveScanPlugin::clone() noexcept {
  try {
    return new DualScaleSelectiveScanPlugin(mValues);
  } catch (...) {
    return nullptr;
  }
}
}  // namespace qmamba
