#include "hadamardQuantPlugin.h"

#include "common/launch.h"

namespace qmamba {

OpInfo const& HadamardQuantPlugin::info() {
  static OpInfo const i{"HadamardQuant", {{"scale", PluginFieldType::kFLOAT32, 0.0, 1e30, true}}};
  return i;
}

IPluginV3* HadamardQuantPlugin::clone() noexcept { return cloneAs(*this); }

bool HadamardQuantPlugin::typeAllowed(int32_t pos, DataType t, DynamicPluginTensorDesc const*) const noexcept {
  return pos == 0 ? (t == DataType::kFLOAT || t == DataType::kHALF) : t == DataType::kINT8;
}

bool HadamardQuantPlugin::outputShapes(DimsExprs const* in, DimsExprs* out, IExprBuilder&) const noexcept {
  if (in[0].nbDims != 3) return false;
  out[0] = in[0];
  return true;
}

// D = m * 2^k with m in {1, 12, 20, 28} (spec 4.6); unknown (-1) passes until the shape is known
static bool hadamardSize(int64_t d) {
  if (d == -1) return true;
  for (int64_t m : {1, 12, 20, 28})
    if (d >= m && d % m == 0 && ((d / m) & (d / m - 1)) == 0) return true;
  return false;
}

bool HadamardQuantPlugin::checkShapes(Dims const* in, Dims const* out, std::string& why) const noexcept {
  if (!rankIs(in[0], 3) || !rankIs(out[0], 3)) {
    why = "X must be [B, L, D], got " + dimsStr(in[0]);
    return false;
  }
  if (!hadamardSize(in[0].d[2])) {
    why = "D = " + std::to_string(in[0].d[2]) + " has no spec Hadamard matrix (D = m * 2^k, m in {1, 12, 20, 28})";
    return false;
  }
  return true;
}

int32_t HadamardQuantPlugin::enqueue(PluginTensorDesc const* inDesc, PluginTensorDesc const*, void const* const* inputs,
                                     void* const* outputs, void*, cudaStream_t stream) noexcept {
  std::string why;
  if (launchHadamardQuant(inDesc, inputs, outputs, fieldF(kScale), stream, why) != QM_OK)
    return fail("enqueue: " + why);
  return 0;
}

}  // namespace qmamba
