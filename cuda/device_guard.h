// Host-side RAII guard for the current CUDA device: the setup code switches devices while it
// visits every rank, and must leave the caller's current device as it found it.
#pragma once

#include <cuda_runtime_api.h>

namespace jaxep {

// Saves the current device on construction and makes it current again on destruction (the
// query's failure leaves device 0, as does a thread that never selected one).
class DeviceGuard {
 public:
  DeviceGuard() { cudaGetDevice(&previous_); }
  ~DeviceGuard() { cudaSetDevice(previous_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = 0;
};

}  // namespace jaxep
