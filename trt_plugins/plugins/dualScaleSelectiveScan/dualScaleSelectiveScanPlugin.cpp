#include "dualScaleSelectiveScanPlugin.h"

namespace qmamba {
OpInfo const& DualScaleSelectiveScanPlugin::info() {
  static OpInfo const i{"DualScaleSelectiveScan", ScanPlugin::int8Fields()};
  return i;
}

IPluginV3* DualScaleSelectiveScanPlugin::clone() noexcept { return cloneAs(*this); }
}  // namespace qmamba
