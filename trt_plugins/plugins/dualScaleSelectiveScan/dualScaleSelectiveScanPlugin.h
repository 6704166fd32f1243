#pragma once
#include "common/scanPlugin.h"

namespace qmamba {
// DualScaleSelectiveScan: int8 prefill scan: dual-scale (outlier mask) or single-scale u, int8 dt/B/C/z (docs/quantization.md 4.4, 4.5).
class DualScaleSelectiveScanPlugin final : public ScanPlugin {
 public:
  static OpInfo const& info();
  static bool checkFields(std::vector<double> const& v, std::string& why) noexcept {
    return checkScanFields("DualScaleSelectiveScan", true, v, why);
  }
  explicit DualScaleSelectiveScanPlugin(std::vector<double> values) : ScanPlugin(info(), std::move(values), true, false) {}
  IPluginV3* clone() noexcept override;
};
}  // namespace qmamba
