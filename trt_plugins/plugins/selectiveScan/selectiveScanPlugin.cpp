#include "selectiveScanPlugin.h"

namespace qmamba {
OpInfo const& SelectiveScanPlugin::info() {
  static OpInfo const i{"SelectiveScan", {{"y_dtype", PluginFieldType::kINT32, 1, 10, false}}};
  return i;
}

IPluginV3* SelectiveScanPlugin::clone() noexcept { return cloneAs(*this); }
}  // namespace qmamba
