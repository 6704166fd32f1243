#include "scanPlugin.h"

#include "launch.h"

namespace qmamba {

std::vector<FieldSpec> ScanPlugin::int8Fields() {
  constexpr double kMax = 1e30;
  return {{"u_scale", PluginFieldType::kFLOAT32, 0.0, kMax, true},
          {"u_outlier_scale", PluginFieldType::kFLOAT32, 0.0, kMax, false},
          {"dt_scale", PluginFieldType::kFLOAT32, 0.0, kMax, true},
          {"B_scale", PluginFieldType::kFLOAT32, 0.0, kMax, true},
          {"C_scale", PluginFieldType::kFLOAT32, 0.0, kMax, true},
          {"z_scale", PluginFieldType::kFLOAT32, 0.0, kMax, true},
          {"dual_scale", PluginFieldType::kINT32, 0, 1, false},
          {"y_dtype", PluginFieldType::kINT32, 1, 10, false}};
}

bool ScanPlugin::checkScanFields(char const* op, bool int8Inputs, std::vector<double> const& v,
                                 std::string& why) noexcept {
  const double y = int8Inputs ? v[kYDtype] : v[0];
  if (y != 1 && y != 10) {
    why = std::string(op) + ": y_dtype must be 1 (float32) or 10 (float16), got " + std::to_string(int(y));
    return false;
  }
  if (int8Inputs && v[kDualScale] == 1 && v[kUOutlierScale] <= 0) {
    why = std::string(op) + ": dual_scale=1 needs u_outlier_scale > 0";
    return false;
  }
  return true;
}

// Input positions: U, [U_mask], dt, Bmat, Cmat, Z, A, Dskip, dt_bias, state; outputs Y, state_out.
bool ScanPlugin::typeAllowed(int32_t pos, DataType t, DynamicPluginTensorDesc const*) const noexcept {
  const int32_t nin = nbInputs();
  if (pos >= nin) return t == outputType(pos - nin, nullptr);
  const int32_t p = (dual() && pos >= 1) ? pos - 1 : pos;  // position as if there were no mask
  if (dual() && pos == 1) return t == DataType::kUINT8;
  if (p <= 4) return t == (mInt8 ? DataType::kINT8 : DataType::kFLOAT);  // U, dt, Bmat, Cmat, Z
  return t == DataType::kFLOAT;                                          // A, Dskip, dt_bias, state
}

DataType ScanPlugin::outputType(int32_t index, DataType const*) const noexcept {
  if (index == 0) return yDtype() == 10 ? DataType::kHALF : DataType::kFLOAT;
  return DataType::kFLOAT;
}

bool ScanPlugin::outputShapes(DimsExprs const* in, DimsExprs* out, IExprBuilder&) const noexcept {
  DimsExprs const& u = in[0];
  DimsExprs const& state = in[nbInputs() - 1];
  if (u.nbDims != 3 || state.nbDims != 3) return false;
  out[0] = u;
  out[1] = state;
  return true;
}

bool ScanPlugin::checkShapes(Dims const* in, Dims const* out, std::string& why) const noexcept {
  const int32_t o = dual() ? 1 : 0;
  Dims const &u = in[0], &dt = in[1 + o], &bm = in[2 + o], &cm = in[3 + o], &z = in[4 + o], &a = in[5 + o],
             &dsk = in[6 + o], &bias = in[7 + o], &st = in[8 + o];
  bool ok = rankIs(u, 3) && rankIs(dt, 3) && rankIs(bm, 3) && rankIs(cm, 3) && rankIs(z, 3) && rankIs(a, 2) &&
            rankIs(dsk, 1) && rankIs(bias, 1) && rankIs(st, 3) && rankIs(out[0], 3) && rankIs(out[1], 3) &&
            (!dual() || rankIs(in[1], 3));
  if (ok) {
    const int64_t B = u.d[0], L = u.d[1], D = u.d[2], N = a.d[1];
    for (Dims const* x : {&dt, &z}) ok = ok && dimOk(x->d[0], B) && dimOk(x->d[1], L) && dimOk(x->d[2], D);
    if (dual()) ok = ok && dimOk(in[1].d[0], B) && dimOk(in[1].d[1], L) && dimOk(in[1].d[2], D);
    for (Dims const* x : {&bm, &cm}) ok = ok && dimOk(x->d[0], B) && dimOk(x->d[1], L) && dimOk(x->d[2], N);
    ok = ok && dimOk(a.d[0], D) && dimOk(dsk.d[0], D) && dimOk(bias.d[0], D) && dimOk(st.d[0], B) &&
         dimOk(st.d[1], D) && dimOk(st.d[2], N);
    ok = ok && (N == -1 || N == 8 || N == 16 || N == 32 || N == 64) && (!mDecode || dimOk(L, 1));
  }
  if (!ok)
    why = std::string("expected U, dt, Z [B, L, D]") + (dual() ? ", U_mask [B, L, D]" : "") +
          ", Bmat/Cmat [B, L, N], A [D, N] with N in {8, 16, 32, 64}, Dskip/dt_bias [D], state [B, D, N]" +
          (mDecode ? ", L = 1" : "") + "; got U " + dimsStr(u) + (dual() ? ", U_mask " + dimsStr(in[1]) : "") +
          ", Bmat " + dimsStr(bm) + ", A " + dimsStr(a) +
          ", state " + dimsStr(st);
  return ok;
}

size_t ScanPlugin::getWorkspaceSize(DynamicPluginTensorDesc const* inputs, int32_t nbIn, DynamicPluginTensorDesc const*,
                                    int32_t) const noexcept {
  if (inputs == nullptr || nbIn != nbInputs()) return 0;
  Dims const& u = inputs[0].max;
  Dims const& a = inputs[dual() ? 6 : 5].max;
  size_t bytes = 0;
  if (u.nbDims != 3 || a.nbDims != 2 || u.d[0] <= 0 || u.d[1] <= 0 || u.d[2] <= 0 || a.d[1] <= 0 ||
      qm_selective_scan_workspace_size(static_cast<int>(u.d[0]), static_cast<int>(u.d[1]), static_cast<int>(u.d[2]),
                                       static_cast<int>(a.d[1]), &bytes) != QM_OK)
    return 0;
  return bytes;
}

int32_t ScanPlugin::enqueue(PluginTensorDesc const* inDesc, PluginTensorDesc const* outDesc, void const* const* inputs,
                            void* const* outputs, void* workspace, cudaStream_t stream) noexcept {
  ScanFields f{mInt8, mDecode, dual() ? 1 : 0, yDtype(), 1.f, 0.f, 1.f, 1.f, 1.f, 1.f};
  if (mInt8) {
    f.uScale = fieldF(kUScale);
    f.uOutlierScale = fieldF(kUOutlierScale);
    f.dtScale = fieldF(kDtScale);
    f.BScale = fieldF(kBScale);
    f.CScale = fieldF(kCScale);
    f.zScale = fieldF(kZScale);
  }
  std::string why;
  if (launchScan(inDesc, outDesc, inputs, outputs, workspace, f, stream, why) != QM_OK)
    return fail("enqueue: " + why);
  return 0;
}

}  // namespace qmamba
