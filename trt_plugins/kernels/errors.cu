// Error reporting of the C ABI: a thread-local message and status strings.
#include <stdarg.h>

#include "common.cuh"

namespace {
thread_local char g_msg[512] = "";
}

namespace qm {
void set_error(const char* fmt, ...) {
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(g_msg, sizeof g_msg, fmt, ap);
  va_end(ap);
}

int fail_cuda(const char* what, cudaError_t e) {
  set_error("%s: CUDA error %d (%s)", what, static_cast<int>(e), cudaGetErrorString(e));
  return QM_ERR_CUDA;
}

int sm_count() {
  static int sms[64] = {};
  int dev = 0;
  if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) dev = 0;
  if (sms[dev] == 0 && cudaDeviceGetAttribute(&sms[dev], cudaDevAttrMultiProcessorCount, dev) != cudaSuccess)
    sms[dev] = 132;
  return sms[dev];
}
}  // namespace qm

extern "C" {
const char* qm_last_error(void) { return g_msg; }
const char* qm_status_string(int status) {
  switch (status) {
    case QM_OK: return "ok";
    case QM_ERR_INVALID_ARGUMENT: return "invalid argument";
    case QM_ERR_UNSUPPORTED: return "unsupported";
    case QM_ERR_CUDA: return "CUDA error";
    default: return "unknown status";
  }
}
int qm_abi_version(void) { return 9; }
}
