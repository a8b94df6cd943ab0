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

/// What `finemem devices` prints about one device: its limits, capabilities and ports.
package struct VerbsDeviceReport: Sendable {
    package var info: VerbsDeviceInfo
    package var limits: VerbsDeviceLimits
    package var ports: [VerbsPortInfo]
    /// The GID and port a FineMem connection would use, when one is usable.
    package var chosenPath: VerbsPath?

    /// Opens `device` and queries it.
    package init(_ device: VerbsDeviceInfo) throws(VerbsError) {
        let context = try VerbsContext(device: device.name)
        info = device
        limits = context.limits
        ports = []
        for number in 1...max(1, limits.physicalPorts) {
            ports.append(try context.port(UInt8(number)))
        }
        chosenPath = try? VerbsPath.choose(context: context)
    }

    /// The report as indented lines.
    package var lines: [String] {
        var lines = ["\(info.name)  guid 0x\(String(info.guid, radix: 16))  vendor 0x\(String(limits.vendorID, radix: 16))  firmware \(limits.firmware.isEmpty ? "-" : limits.firmware)"]
        lines.append("  atomics: \(limits.atomics)" + (limits.atomics == .none ? ": FineMem cannot use this device" : ""))
        var windows: [String] = []
        if limits.memoryWindows { windows.append("type 1") }
        if limits.windowType2A { windows.append("type 2A") }
        if limits.windowType2B { windows.append("type 2B") }
        lines.append("  memory windows: \(windows.isEmpty ? "none" : windows.joined(separator: ", ")), max_mw \(limits.maxMemoryWindows)")
        lines.append("  limits: max_qp \(limits.maxQueuePairs), max_mr \(limits.maxMemoryRegions), max_pd \(limits.maxProtectionDomains), max_qp_wr \(limits.maxQueuePairWorkRequests), max_cqe \(limits.maxCompletionQueueEntries), max_qp_rd_atom \(limits.maxResponderReadAtomic), max_qp_init_rd_atom \(limits.maxInitiatorReadAtomic), max_sge \(limits.maxScatterGather)")
        for port in ports {
            lines.append("  port \(port.number): \(port.state), link layer \(port.linkLayer), active MTU \(port.activeMTU), LID \(port.lid)")
            for gid in port.gids {
                let used = chosenPath.map { $0.port == port.number && $0.gidIndex == gid.index && $0.global } ?? false
                lines.append("    \(gid)" + (used ? "  <- FineMem connects through this GID" : ""))
            }
        }
        return lines
    }
}
