#pragma once
#include "common/scanPlugin.h"

namespace qmamba {
// SelectiveScan: float32-input scan of the fp16 and w8a8-fpssm recipes (docs/quantization.md 4.4).
class SelectiveScanPlugin final : public ScanPlugin {
 public:
  static OpInfo const& info();
  static bool checkFields(std::vector<double> const& v, std::string& why) noexcept {
    return checkScanFields("SelectiveScan", false, v, why);
  }
  explicit SelectiveScanPlugin(std::vector<double> values) : ScanPlugin(info(), std::move(values), false, false) {}
  IPluginV3* clone() noexcept override;
};
}  // namespace qmamba
