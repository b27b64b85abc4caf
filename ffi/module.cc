// nanobind module jaxep._jaxep_ext: exposes the XLA FFI handlers to Python.
//   has_cuda()      -> bool: whether the CUDA kernels were compiled in
//   registrations() -> dict[str, capsule]: FFI target name -> handler, for
//                      jax.ffi.register_ffi_target(name, capsule, platform="CUDA");
//                      empty without CUDA.
#include <nanobind/nanobind.h>

#include "handlers.h"

namespace nb = nanobind;

namespace {

template <typename Fn>
nb::capsule Encapsulate(Fn* fn) {
  return nb::capsule(reinterpret_cast<void*>(fn));
}

}  // namespace

NB_MODULE(_jaxep_ext, m) {
  m.doc() = "jaxep compiled extension: XLA FFI handlers for the CUDA backend.";

  m.def(
      "has_cuda",
      []() {
#ifdef JAXEP_WITH_CUDA
        return true;
#else
        return false;
#endif
      },
      "True if the CUDA kernels and their FFI handlers were compiled in.");

  m.def(
      "registrations",
      []() {
        nb::dict d;
#ifdef JAXEP_WITH_CUDA
        d["jaxep_dispatch_layout_ffi"] = Encapsulate(JaxepDispatchLayoutFfi);
#endif
        return d;
      },
      "Mapping of FFI target name -> handler capsule (platform CUDA); empty without CUDA.");
}
