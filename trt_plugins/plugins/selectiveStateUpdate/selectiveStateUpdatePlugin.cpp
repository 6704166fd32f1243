#include "selectiveStateUpdatePlugin.h"

namespace qmamba {
OpInfo const& SelectiveStateUpdatePlugin::info() {
  static OpInfo const i{"SelectiveStateUpdate", ScanPlugin::int8Fields()};
  return i;
}

IPluginV3* SelectiveStateUpdatePlugin::clone() noexcept { return cloneAs(*this); }
}  // namespace qmamba
