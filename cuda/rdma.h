// Peers in another node: device-initiated NVSHMEM puts and signals (host side).
// The kernels reach a peer of their own node with loads and stores through its mapped
// workspace, and a peer in another node (EPConfig.ranks_per_node, or not load/store reachable)
// with NVSHMEM puts from a local staging copy: rdma.cuh. This file: whether the extension was
// built with NVSHMEM's device library, and the initialisation of its device state.
#pragma once

#include <string>

namespace jaxep {

// True when the kernels were device-linked with libnvshmem_device.a (CMake found NVSHMEM).
bool NvshmemDeviceLinked();

// Initialises the NVSHMEM device state of the extension's CUDA module on the current device.
// NVSHMEM's host library must already be initialised in this process (jaxep does that with
// nvshmem4py); its device state lives in each module that links the device library, and the
// host init fills only the modules it knows, so the extension registers its own with
// nvshmemx_cumodule_init. Idempotent per device. Returns "" or what failed.
std::string InitNvshmemDevice();

}  // namespace jaxep
