// Peers in another node, host side (see rdma.h): the NVSHMEM device state of the extension's
// module. NVSHMEM's host library is reached through the copy nvshmem4py loaded (dlopen with
// RTLD_NOLOAD), so the extension imports, and runs every single-node path, without it.
#include "rdma.h"

#include <dlfcn.h>

#include <cuda.h>
#include <cuda_runtime.h>

#include <mutex>
#include <set>
#include <string>

#include "ll_kernels.h"  // LLDispatchKernelAddress: a kernel of the module

#if JAXEP_WITH_NVSHMEM
#include <nvshmem.h>
#include <nvshmemx.h>
#endif

namespace jaxep {
namespace {

constexpr const char* kHostLibrary = "libnvshmem_host.so.3";

// The host library nvshmem4py loaded, or null (asked again until it is loaded).
void* HostLibrary() {
  static void* handle = nullptr;
  if (!handle) handle = dlopen(kHostLibrary, RTLD_NOLOAD | RTLD_NOW);
  return handle;
}

template <typename Fn>
Fn HostSymbol(const char* name) {
  void* lib = HostLibrary();
  return lib ? reinterpret_cast<Fn>(dlsym(lib, name)) : nullptr;
}

}  // namespace

#if JAXEP_WITH_NVSHMEM

bool NvshmemDeviceLinked() { return true; }

std::string InitNvshmemDevice() {
  static std::mutex mutex;
  static std::set<int> done;  // devices whose module state is initialised
  std::lock_guard<std::mutex> lock(mutex);
  int device = -1;
  if (cudaGetDevice(&device) != cudaSuccess) return "cudaGetDevice failed";
  if (done.count(device)) return "";
  if (!HostLibrary()) {
    return std::string(kHostLibrary) +
           " is not loaded: initialise NVSHMEM (jaxep does, through nvshmem4py) first";
  }
  auto status = HostSymbol<int (*)()>("nvshmemx_init_status");
  auto cumodule_init = HostSymbol<int (*)(CUmodule)>("nvshmemx_cumodule_init");
  if (!status || !cumodule_init) {
    return std::string(kHostLibrary) + " lacks nvshmemx_init_status or nvshmemx_cumodule_init";
  }
  const int s = status();
  if (s < NVSHMEM_STATUS_IS_INITIALIZED || s == NVSHMEM_STATUS_INVALID) {
    return "NVSHMEM's host library is not initialised (nvshmemx_init_status() = " +
           std::to_string(s) + ", expected >= " + std::to_string(NVSHMEM_STATUS_IS_INITIALIZED) +
           ")";
  }
  // The module holding every kernel (one device-linked image), through one of its kernels.
  cudaFunction_t fn = nullptr;
  cudaError_t err = cudaGetFuncBySymbol(&fn, LLDispatchKernelAddress());
  if (err != cudaSuccess) {
    return std::string("cudaGetFuncBySymbol: ") + cudaGetErrorString(err);
  }
  void* entry = nullptr;
  cudaDriverEntryPointQueryResult found{};
  err = cudaGetDriverEntryPointByVersion("cuFuncGetModule", &entry, 12000, cudaEnableDefault,
                                         &found);
  if (err != cudaSuccess || found != cudaDriverEntryPointSuccess || !entry) {
    return "the CUDA driver lacks cuFuncGetModule";
  }
  CUmodule module = nullptr;
  const CUresult r = reinterpret_cast<CUresult (*)(CUmodule*, CUfunction)>(entry)(
      &module, reinterpret_cast<CUfunction>(fn));
  if (r != CUDA_SUCCESS) return "cuFuncGetModule failed: CUresult " + std::to_string(r);
  if (const int rc = cumodule_init(module); rc != 0) {
    return "nvshmemx_cumodule_init(the extension's module) returned " + std::to_string(rc);
  }
  done.insert(device);
  return "";
}

#else  // !JAXEP_WITH_NVSHMEM

bool NvshmemDeviceLinked() { return false; }

std::string InitNvshmemDevice() {
  return "jaxep was built without NVSHMEM's device library (pip install nvidia-nvshmem-cu13 "
         "before building jaxep, or set NVSHMEM_HOME)";
}

#endif  // JAXEP_WITH_NVSHMEM

}  // namespace jaxep

#if JAXEP_WITH_NVSHMEM
// libnvshmem_device.a's initialisation object (linked with its device code) refers to these
// host-library functions. jaxep never calls that path (it initialises with
// nvshmemx_cumodule_init above), but the extension must load without NVSHMEM: the references
// resolve here, to the host library nvshmem4py loaded.
extern "C" {
__attribute__((visibility("hidden"))) int nvshmemid_init_status() {
  auto fn = jaxep::HostSymbol<int (*)()>("nvshmemid_init_status");
  return fn ? fn() : NVSHMEM_STATUS_NOT_INITIALIZED;
}
__attribute__((visibility("hidden"))) int nvshmemid_hostlib_init_attr(
    int requested, int* provided, unsigned int bootstrap_flags, nvshmemx_init_attr_t* attr,
    nvshmemi_version_t version, nvshmemx_device_lib_init_cb cb) {
  auto fn = jaxep::HostSymbol<int (*)(int, int*, unsigned int, nvshmemx_init_attr_t*,
                                      nvshmemi_version_t, nvshmemx_device_lib_init_cb)>(
      "nvshmemid_hostlib_init_attr");
  return fn ? fn(requested, provided, bootstrap_flags, attr, version, cb) : 1;
}
__attribute__((visibility("hidden"))) void nvshmemid_hostlib_finalize(void* device_ctx,
                                                                      void* transport_ctx) {
  auto fn = jaxep::HostSymbol<void (*)(void*, void*)>("nvshmemid_hostlib_finalize");
  if (fn) fn(device_ctx, transport_ctx);
}
}
#endif
