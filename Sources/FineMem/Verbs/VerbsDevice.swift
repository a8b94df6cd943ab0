import CVerbs
#if canImport(Glibc)
import Glibc
#endif

/// An error from libibverbs, with the call that failed and its errno.
package struct VerbsError: Error, Sendable, Hashable, CustomStringConvertible {
    package let call: String
    package let errno: Int32
    package var description: String { "\(call) failed: \(String(cString: strerror(errno))) (errno \(errno))" }
}

/// An RDMA device as libibverbs lists it.
package struct VerbsDeviceInfo: Sendable, Hashable {
    package let name: String
    /// The node GUID, in host order.
    package let guid: UInt64
}

/// The RDMA devices of this machine.
///
/// `ibv_get_device_list` returns NULL with `ENOSYS` when the kernel has no RDMA support, and
/// an empty list when it has support but no device; both mean "no device" here. The list is
/// freed only when it is not NULL (`ibv_free_device_list(NULL)` crashes).
///
/// ```swift
/// let devices = try VerbsDevices.list()
/// if devices.isEmpty { print("no RDMA device: using the simulated NIC") }
/// ```
package enum VerbsDevices {
    package static func list() throws(VerbsError) -> [VerbsDeviceInfo] {
        var count: Int32 = 0
        finemem_clear_errno()
        guard let list = ibv_get_device_list(&count) else {
            let code = finemem_errno()
            if code == ENOSYS || code == 0 || code == ENODEV || code == ENOENT { return [] }
            throw VerbsError(call: "ibv_get_device_list", errno: code)
        }
        defer { ibv_free_device_list(list) }
        var devices: [VerbsDeviceInfo] = []
        for i in 0..<Int(count) {
            guard let device = list[i] else { break }
            let name = ibv_get_device_name(device).map { String(cString: $0) } ?? "unnamed"
            devices.append(VerbsDeviceInfo(name: name, guid: UInt64(bigEndian: ibv_get_device_guid(device))))
        }
        return devices
    }
}
