#pragma once
#include "common/scanPlugin.h"

namespace qmamba {
// SelectiveStateUpdate: decode: one token of the int8 scan, state in -> state out (docs/quantization.md 4.4 with L = 1).
class SelectiveStateUpdatePlugin final : public ScanPlugin {
 public:
  static OpInfo const& info();
  static bool checkFields(std::vector<double> const& v, std::string& why) noexcept {
    return checkScanFields("SelectiveStateUpdate", true, v, why);
  }
  explicit SelectiveStateUpdatePlugin(std::vector<double> values) : ScanPlugin(info(), std::move(values), true, true) {}
  IPluginV3* clone() noexcept override;
};
}  // namespace qmamba
