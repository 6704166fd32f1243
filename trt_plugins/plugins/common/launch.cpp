#include "launch.h"

namespace qmamba {
std::string kernelError(int status) {
  return std::string(qm_status_string(status)) + ": " + qm_last_error();
}
}  // namespace qmamba
