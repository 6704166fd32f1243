#include "launch.h"

namespace qmamba {
int launchScan(PluginTensorDesc const* in, PluginTensorDesc const*, void const* const* inputs, void* const* outputs,
               void* workspace, ScanFields const& f, cudaStream_t stream, std::string& why) noexcept {
  const int o = f.dualScale ? 1 : 0;
  Dims const& u = in[0].dims;    // [B, L, D]
  Dims const& a = in[5 + o].dims;  // [D, N]
  qm_scan_args args{};
  args.input_dtype = f.int8Inputs ? QM_DTYPE_INT8 : QM_DTYPE_FLOAT32;
  args.u = inputs[0];
  args.u_mask = f.dualScale ? static_cast<uint8_t const*>(inputs[1]) : nullptr;
  args.dt = inputs[1 + o];
  args.B = inputs[2 + o];
  args.C = inputs[3 + o];
  args.z = inputs[4 + o];
  args.A = static_cast<float const*>(inputs[5 + o]);
  args.Dskip = static_cast<float const*>(inputs[6 + o]);
  args.dt_bias = static_cast<float const*>(inputs[7 + o]);
  args.initial_state = static_cast<float const*>(inputs[8 + o]);
  args.y = outputs[0];
  args.y_dtype = f.yDtype == 10 ? QM_DTYPE_FLOAT16 : QM_DTYPE_FLOAT32;
  args.final_state = static_cast<float*>(outputs[1]);
  args.batch = static_cast<int>(u.d[0]);
  args.seqlen = static_cast<int>(u.d[1]);
  args.dim = static_cast<int>(u.d[2]);
  args.dstate = static_cast<int>(a.d[1]);
  args.dual_scale = f.dualScale;
  args.u_scale = f.uScale;
  args.u_outlier_scale = f.uOutlierScale;
  args.dt_scale = f.dtScale;
  args.B_scale = f.BScale;
  args.C_scale = f.CScale;
  args.z_scale = f.zScale;
  args.workspace = workspace;
  args.early_state = 0;  // in an engine the kernel before ours may write the state
  size_t bytes = 0;
  int rc = qm_selective_scan_workspace_size(args.batch, args.seqlen, args.dim, args.dstate, &bytes);
  args.workspace_bytes = bytes;
  if (rc == QM_OK) rc = f.decode ? qm_selective_state_update(&args, stream) : qm_selective_scan(&args, stream);
  if (rc != QM_OK) why = kernelError(rc);
  return rc;
}
}  // namespace qmamba
