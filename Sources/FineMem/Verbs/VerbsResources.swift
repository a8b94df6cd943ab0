import CVerbs
#if canImport(Glibc)
import Glibc
#endif

// Swift owners of libibverbs resources. Each class frees its resource in `deinit` and keeps
// a strong reference to whatever must outlive it, so the release order is the one verbs
// requires: a queue pair before its completion queue and protection domain, windows before
// their region, regions before their protection domain, everything before the context.

/// The calls fail with errno (or return it): wraps both into a `VerbsError`.
@inline(__always)
func verbsCheck(_ status: Int32, _ call: String) throws(VerbsError) {
    guard status == 0 else { throw VerbsError(call: call, errno: status > 0 ? status : finemem_errno()) }
}

/// The atomic capability of a device (`ibv_device_attr.atomic_cap`).
package enum VerbsAtomicCapability: Sendable, Hashable, CustomStringConvertible {
    /// No remote atomics.
    case none
    /// Atomic only against other RDMA atomics through the same NIC (`IBV_ATOMIC_HCA`).
    case hca
    /// Atomic also against the CPU and other NICs (`IBV_ATOMIC_GLOB`).
    case global

    init(_ raw: ibv_atomic_cap) {
        switch raw {
        case IBV_ATOMIC_HCA: self = .hca
        case IBV_ATOMIC_GLOB: self = .global
        default: self = .none
        }
    }

    package var description: String {
        switch self {
        case .none: "none"
        case .hca: "HCA (atomic against RDMA atomics through this NIC only)"
        case .global: "GLOB (atomic against the CPU too)"
        }
    }
}

/// The limits and capabilities of a device that FineMem depends on.
package struct VerbsDeviceLimits: Sendable, Hashable {
    package var atomics: VerbsAtomicCapability
    package var maxMemoryWindows: Int
    package var maxQueuePairs: Int
    package var maxMemoryRegions: Int
    package var maxProtectionDomains: Int
    package var maxQueuePairWorkRequests: Int
    package var maxCompletionQueueEntries: Int
    /// Outstanding READs and atomics a QP may have as responder (`max_qp_rd_atom`).
    package var maxResponderReadAtomic: Int
    /// Outstanding READs and atomics a QP may initiate (`max_qp_init_rd_atom`).
    package var maxInitiatorReadAtomic: Int
    package var maxScatterGather: Int
    package var memoryWindows: Bool
    package var windowType2A: Bool
    package var windowType2B: Bool
    package var physicalPorts: Int
    package var firmware: String
    package var vendorID: UInt32

    package init(_ attr: ibv_device_attr) {
        atomics = VerbsAtomicCapability(attr.atomic_cap)
        maxMemoryWindows = Int(attr.max_mw)
        maxQueuePairs = Int(attr.max_qp)
        maxMemoryRegions = Int(attr.max_mr)
        maxProtectionDomains = Int(attr.max_pd)
        maxQueuePairWorkRequests = Int(attr.max_qp_wr)
        maxCompletionQueueEntries = Int(attr.max_cqe)
        maxResponderReadAtomic = Int(attr.max_qp_rd_atom)
        maxInitiatorReadAtomic = Int(attr.max_qp_init_rd_atom)
        maxScatterGather = Int(attr.max_sge)
        let flags = UInt32(attr.device_cap_flags)
        memoryWindows = flags & IBV_DEVICE_MEM_WINDOW.rawValue != 0
        windowType2A = flags & IBV_DEVICE_MEM_WINDOW_TYPE_2A.rawValue != 0
        windowType2B = flags & IBV_DEVICE_MEM_WINDOW_TYPE_2B.rawValue != 0
        physicalPorts = Int(attr.phys_port_cnt)
        firmware = withUnsafeBytes(of: attr.fw_ver) { raw in
            String(decoding: raw.prefix { $0 != 0 }, as: UTF8.self)
        }
        vendorID = attr.vendor_id
    }
}

/// The link layer of a port.
package enum VerbsLinkLayer: Sendable, Hashable, CustomStringConvertible {
    case infiniband, ethernet, unspecified
    package var description: String {
        switch self {
        case .infiniband: "InfiniBand"
        case .ethernet: "Ethernet (RoCE)"
        case .unspecified: "unspecified"
        }
    }
}

/// A GID table entry with its type (RoCE v1, RoCE v2 or InfiniBand).
package struct VerbsGID: Sendable, Hashable, CustomStringConvertible {
    package enum Kind: Sendable, Hashable { case infiniband, roceV1, roceV2 }
    package var index: Int
    package var raw: [UInt8]
    package var kind: Kind

    /// Whether the GID is an IPv4-mapped IPv6 address (`::ffff:a.b.c.d`).
    package var isIPv4Mapped: Bool { raw[0..<10].allSatisfy { $0 == 0 } && raw[10] == 0xff && raw[11] == 0xff }
    package var isZero: Bool { raw.allSatisfy { $0 == 0 } }

    package var address: String {
        if isIPv4Mapped { return "::ffff:" + raw[12...].map(String.init).joined(separator: ".") }
        return stride(from: 0, to: 16, by: 2).map { String(UInt16(raw[$0]) << 8 | UInt16(raw[$0 + 1]), radix: 16) }.joined(separator: ":")
    }

    package var description: String {
        let type = switch kind {
        case .infiniband: "IB"
        case .roceV1: "RoCE v1"
        case .roceV2: "RoCE v2"
        }
        return "GID[\(index)] \(address) (\(type))"
    }
}

/// A port of a device and its GIDs.
package struct VerbsPortInfo: Sendable, Hashable {
    package var number: UInt8
    package var active: Bool
    package var state: String
    package var linkLayer: VerbsLinkLayer
    package var lid: UInt16
    package var activeMTU: Int
    package var gids: [VerbsGID]

    /// The GID a connection uses: on RoCE, RoCE v2 before v1 and an IPv4-mapped address
    /// before an IPv6 one unless `preferIPv6`; on InfiniBand, GID 0 (the LID routes).
    package func preferredGID(preferIPv6: Bool = false) -> VerbsGID? {
        if linkLayer != .ethernet { return gids.first { $0.index == 0 } }
        let ranked = gids.filter { !$0.isZero && $0.kind != .infiniband }.sorted { a, b in
            func rank(_ g: VerbsGID) -> Int {
                (g.kind == .roceV2 ? 0 : 2) + (g.isIPv4Mapped != preferIPv6 ? 0 : 1)
            }
            return (rank(a), a.index) < (rank(b), b.index)
        }
        return ranked.first
    }
}

/// An open device (`ibv_open_device`); closed when released.
package final class VerbsContext: @unchecked Sendable {
    package let name: String
    package let raw: UnsafeMutablePointer<ibv_context>
    package let limits: VerbsDeviceLimits

    /// Opens the device called `name`; nil when there is no such device.
    package init(device name: String) throws(VerbsError) {
        var count: Int32 = 0
        finemem_clear_errno()
        guard let list = ibv_get_device_list(&count) else {
            throw VerbsError(call: "ibv_get_device_list (no RDMA device: \(name) not found)", errno: finemem_errno() == 0 ? ENODEV : finemem_errno())
        }
        defer { ibv_free_device_list(list) }
        var found: UnsafeMutablePointer<ibv_device>?
        for i in 0..<Int(count) {
            if let device = list[i], let cName = ibv_get_device_name(device), String(cString: cName) == name { found = device }
        }
        guard let found else { throw VerbsError(call: "ibv_get_device_list (no device named \(name))", errno: ENODEV) }
        guard let context = ibv_open_device(found) else { throw VerbsError(call: "ibv_open_device(\(name))", errno: finemem_errno()) }
        var attr = ibv_device_attr()
        let status = ibv_query_device(context, &attr)
        guard status == 0 else {
            ibv_close_device(context)
            throw VerbsError(call: "ibv_query_device(\(name))", errno: status)
        }
        self.name = name
        self.raw = context
        self.limits = VerbsDeviceLimits(attr)
    }

    deinit { ibv_close_device(raw) }

    /// Port `number` (1-based) and its GID table (entries that are not zero).
    package func port(_ number: UInt8) throws(VerbsError) -> VerbsPortInfo {
        var attr = ibv_port_attr()
        try verbsCheck(finemem_ibv_query_port(raw, number, &attr), "ibv_query_port(\(name), \(number))")
        let linkLayer: VerbsLinkLayer = switch Int32(attr.link_layer) {
        case Int32(IBV_LINK_LAYER_INFINIBAND): .infiniband
        case Int32(IBV_LINK_LAYER_ETHERNET): .ethernet
        default: .unspecified
        }
        var gids: [VerbsGID] = []
        for index in 0..<min(Int(attr.gid_tbl_len), 256) {
            var entry = ibv_gid_entry()
            guard ibv_query_gid_ex(raw, UInt32(number), UInt32(index), &entry, 0) == 0 else { continue }
            let bytes = withUnsafeBytes(of: entry.gid.raw) { Array($0) }
            if bytes.allSatisfy({ $0 == 0 }) { continue }
            let kind: VerbsGID.Kind = switch entry.gid_type {
            case UInt32(IBV_GID_TYPE_ROCE_V2.rawValue): .roceV2
            case UInt32(IBV_GID_TYPE_ROCE_V1.rawValue): .roceV1
            default: linkLayer == .ethernet ? .roceV1 : .infiniband
            }
            gids.append(VerbsGID(index: index, raw: bytes, kind: kind))
        }
        return VerbsPortInfo(
            number: number, active: attr.state == IBV_PORT_ACTIVE, state: String(cString: ibv_port_state_str(attr.state)),
            linkLayer: linkLayer, lid: attr.lid, activeMTU: Self.mtuBytes(attr.active_mtu), gids: gids)
    }

    package static func mtuBytes(_ mtu: ibv_mtu) -> Int {
        switch mtu {
        case IBV_MTU_256: 256
        case IBV_MTU_512: 512
        case IBV_MTU_1024: 1024
        case IBV_MTU_2048: 2048
        case IBV_MTU_4096: 4096
        default: 0
        }
    }
}

/// A protection domain (`ibv_alloc_pd`).
package final class VerbsProtectionDomain: @unchecked Sendable {
    package let context: VerbsContext
    package let raw: UnsafeMutablePointer<ibv_pd>

    package init(context: VerbsContext) throws(VerbsError) {
        guard let pd = ibv_alloc_pd(context.raw) else { throw VerbsError(call: "ibv_alloc_pd", errno: finemem_errno()) }
        self.context = context
        raw = pd
    }

    deinit { ibv_dealloc_pd(raw) }
}

/// Remote access flags of a region or window, as `ibv_access_flags`.
package func verbsAccessFlags(_ access: RemoteAccess, localWrite: Bool, bindable: Bool) -> UInt32 {
    var flags: UInt32 = 0
    if localWrite || access.contains(.write) || access.contains(.atomic) { flags |= IBV_ACCESS_LOCAL_WRITE.rawValue }
    if access.contains(.read) { flags |= IBV_ACCESS_REMOTE_READ.rawValue }
    if access.contains(.write) { flags |= IBV_ACCESS_REMOTE_WRITE.rawValue }
    if access.contains(.atomic) { flags |= IBV_ACCESS_REMOTE_ATOMIC.rawValue }
    if bindable { flags |= IBV_ACCESS_MW_BIND.rawValue }
    return flags
}

/// A memory region (`ibv_reg_mr`); deregistered when released. Its windows hold it.
package final class VerbsMemoryRegion: @unchecked Sendable {
    package let protectionDomain: VerbsProtectionDomain
    package let raw: UnsafeMutablePointer<ibv_mr>
    package let address: UnsafeMutableRawPointer
    package let length: Int

    package init(pd: VerbsProtectionDomain, address: UnsafeMutableRawPointer, length: Int, accessFlags: UInt32) throws(VerbsError) {
        guard let mr = finemem_ibv_reg_mr(pd.raw, address, length, Int32(bitPattern: accessFlags)) else {
            throw VerbsError(call: "ibv_reg_mr(\(length) bytes)", errno: finemem_errno())
        }
        protectionDomain = pd
        raw = mr
        self.address = address
        self.length = length
    }

    package var lkey: UInt32 { raw.pointee.lkey }
    package var rkey: UInt32 { raw.pointee.rkey }

    /// Deregisters now; `ibv_dereg_mr` refuses (EINVAL) while a type-1 window is bound.
    /// Afterwards the object must not be used.
    private var released = false
    package func deregister() throws(VerbsError) {
        guard !released else { return }
        try verbsCheck(ibv_dereg_mr(raw), "ibv_dereg_mr")
        released = true
    }

    deinit { if !released { ibv_dereg_mr(raw) } }
}

/// A memory window (`ibv_alloc_mw`), type 1 or type 2; deallocated when released.
package final class VerbsMemoryWindow: @unchecked Sendable {
    package enum Kind: Sendable { case type1, type2 }
    package let protectionDomain: VerbsProtectionDomain
    package let raw: UnsafeMutablePointer<ibv_mw>
    package let kind: Kind
    /// The region of the current binding (kept alive while bound).
    package var boundRegion: VerbsMemoryRegion?

    package init(pd: VerbsProtectionDomain, kind: Kind) throws(VerbsError) {
        guard let mw = ibv_alloc_mw(pd.raw, kind == .type1 ? IBV_MW_TYPE_1 : IBV_MW_TYPE_2) else {
            throw VerbsError(call: "ibv_alloc_mw(\(kind))", errno: finemem_errno())
        }
        protectionDomain = pd
        raw = mw
        self.kind = kind
    }

    package var rkey: UInt32 {
        get { raw.pointee.rkey }
        set { raw.pointee.rkey = newValue }
    }

    deinit { ibv_dealloc_mw(raw) }
}

/// A completion queue (`ibv_create_cq`).
package final class VerbsCompletionQueue: @unchecked Sendable {
    package let context: VerbsContext
    package let raw: UnsafeMutablePointer<ibv_cq>

    package init(context: VerbsContext, entries: Int) throws(VerbsError) {
        guard let cq = ibv_create_cq(context.raw, Int32(entries), nil, nil, 0) else {
            throw VerbsError(call: "ibv_create_cq(\(entries))", errno: finemem_errno())
        }
        self.context = context
        raw = cq
    }

    deinit { ibv_destroy_cq(raw) }

    /// Polls up to `into.count` completions without waiting.
    package func poll(into buffer: UnsafeMutableBufferPointer<ibv_wc>) throws(VerbsError) -> Int {
        let n = ibv_poll_cq(raw, Int32(buffer.count), buffer.baseAddress)
        guard n >= 0 else { throw VerbsError(call: "ibv_poll_cq", errno: EIO) }
        return Int(n)
    }
}

/// The states of a queue pair.
package enum VerbsQueuePairState: Sendable, Hashable {
    case reset, initialized, readyToReceive, readyToSend, error, other(UInt32)

    init(_ raw: ibv_qp_state) {
        switch raw {
        case IBV_QPS_RESET: self = .reset
        case IBV_QPS_INIT: self = .initialized
        case IBV_QPS_RTR: self = .readyToReceive
        case IBV_QPS_RTS: self = .readyToSend
        case IBV_QPS_ERR: self = .error
        default: self = .other(raw.rawValue)
        }
    }
}

/// What one side of a reliable connection tells the other (exchanged at bootstrap).
package struct VerbsEndpoint: Sendable, Hashable {
    package var queuePairNumber: UInt32
    package var lid: UInt16
    package var gid: [UInt8]
    package var packetSequenceNumber: UInt32

    package init(queuePairNumber: UInt32, lid: UInt16, gid: [UInt8], packetSequenceNumber: UInt32) {
        self.queuePairNumber = queuePairNumber
        self.lid = lid
        self.gid = gid
        self.packetSequenceNumber = packetSequenceNumber
    }
}

/// Where a queue pair sends from: the port, its GID index and MTU.
package struct VerbsPath: Sendable, Hashable {
    package var port: UInt8
    package var gidIndex: Int
    package var gid: [UInt8]
    package var lid: UInt16
    /// Whether the path needs a global route header (RoCE always does).
    package var global: Bool
    package var mtu: ibv_mtu

    /// The path on `port` of `context`, with the GID `preferredGID` picks.
    package static func choose(context: VerbsContext, port: UInt8 = 1, preferIPv6: Bool = false) throws(VerbsError) -> VerbsPath {
        let info = try context.port(port)
        guard info.active else { throw VerbsError(call: "port \(port) of \(context.name) is \(info.state), not ACTIVE", errno: ENETDOWN) }
        guard let gid = info.preferredGID(preferIPv6: preferIPv6) ?? (info.linkLayer == .infiniband ? nil : info.gids.first) else {
            if info.linkLayer == .infiniband {
                return VerbsPath(port: port, gidIndex: 0, gid: Array(repeating: 0, count: 16), lid: info.lid, global: false, mtu: Self.mtu(info.activeMTU))
            }
            throw VerbsError(call: "no usable GID on port \(port) of \(context.name)", errno: EADDRNOTAVAIL)
        }
        return VerbsPath(
            port: port, gidIndex: gid.index, gid: gid.raw, lid: info.lid, global: info.linkLayer == .ethernet,
            mtu: Self.mtu(info.activeMTU))
    }

    static func mtu(_ bytes: Int) -> ibv_mtu {
        switch bytes {
        case 4096...: IBV_MTU_4096
        case 2048...: IBV_MTU_2048
        case 1024...: IBV_MTU_1024
        case 512...: IBV_MTU_512
        default: IBV_MTU_256
        }
    }
}

/// A reliable-connected queue pair (`ibv_create_qp`, `IBV_QPT_RC`) and its state machine.
package final class VerbsQueuePair: @unchecked Sendable {
    package let protectionDomain: VerbsProtectionDomain
    package let completionQueue: VerbsCompletionQueue
    package let raw: UnsafeMutablePointer<ibv_qp>
    package let sendQueueDepth: Int
    /// Outstanding READs and atomics this QP initiates (`max_rd_atomic`).
    package let readAtomicDepth: Int

    package init(pd: VerbsProtectionDomain, cq: VerbsCompletionQueue, sendQueueDepth: Int) throws(VerbsError) {
        var attr = ibv_qp_init_attr()
        attr.send_cq = cq.raw
        attr.recv_cq = cq.raw
        attr.qp_type = IBV_QPT_RC
        attr.sq_sig_all = 0
        attr.cap.max_send_wr = UInt32(sendQueueDepth)
        attr.cap.max_recv_wr = 1
        attr.cap.max_send_sge = 1
        attr.cap.max_recv_sge = 1
        guard let qp = ibv_create_qp(pd.raw, &attr) else { throw VerbsError(call: "ibv_create_qp(RC)", errno: finemem_errno()) }
        protectionDomain = pd
        completionQueue = cq
        raw = qp
        self.sendQueueDepth = sendQueueDepth
        let limits = pd.context.limits
        readAtomicDepth = max(1, min(16, limits.maxInitiatorReadAtomic, limits.maxResponderReadAtomic))
    }

    deinit { ibv_destroy_qp(raw) }

    package var number: UInt32 { raw.pointee.qp_num }

    package var state: VerbsQueuePairState {
        var attr = ibv_qp_attr()
        var initAttr = ibv_qp_init_attr()
        guard ibv_query_qp(raw, &attr, Int32(bitPattern: IBV_QP_STATE.rawValue), &initAttr) == 0 else { return .other(UInt32.max) }
        return VerbsQueuePairState(attr.qp_state)
    }

    private func modify(_ attr: inout ibv_qp_attr, _ mask: UInt32, _ step: String) throws(VerbsError) {
        try verbsCheck(ibv_modify_qp(raw, &attr, Int32(bitPattern: mask)), "ibv_modify_qp(\(step))")
    }

    /// RESET -> INIT with remote READ, WRITE and atomic access.
    package func toInit(port: UInt8) throws(VerbsError) {
        var attr = ibv_qp_attr()
        attr.qp_state = IBV_QPS_INIT
        attr.pkey_index = 0
        attr.port_num = port
        attr.qp_access_flags = IBV_ACCESS_LOCAL_WRITE.rawValue | IBV_ACCESS_REMOTE_READ.rawValue
            | IBV_ACCESS_REMOTE_WRITE.rawValue | IBV_ACCESS_REMOTE_ATOMIC.rawValue
        try modify(&attr, IBV_QP_STATE.rawValue | IBV_QP_PKEY_INDEX.rawValue | IBV_QP_PORT.rawValue | IBV_QP_ACCESS_FLAGS.rawValue, "RESET->INIT")
    }

    /// INIT -> RTR towards `remote` over `path`.
    package func toReadyToReceive(remote: VerbsEndpoint, path: VerbsPath) throws(VerbsError) {
        var attr = ibv_qp_attr()
        attr.qp_state = IBV_QPS_RTR
        attr.path_mtu = path.mtu
        attr.dest_qp_num = remote.queuePairNumber
        attr.rq_psn = remote.packetSequenceNumber
        attr.max_dest_rd_atomic = UInt8(readAtomicDepth)
        attr.min_rnr_timer = 12
        attr.ah_attr.dlid = remote.lid
        attr.ah_attr.sl = 0
        attr.ah_attr.src_path_bits = 0
        attr.ah_attr.port_num = path.port
        if path.global {
            attr.ah_attr.is_global = 1
            withUnsafeMutableBytes(of: &attr.ah_attr.grh.dgid.raw) { $0.copyBytes(from: remote.gid) }
            attr.ah_attr.grh.sgid_index = UInt8(path.gidIndex)
            attr.ah_attr.grh.hop_limit = 64
        }
        try modify(
            &attr,
            IBV_QP_STATE.rawValue | IBV_QP_AV.rawValue | IBV_QP_PATH_MTU.rawValue | IBV_QP_DEST_QPN.rawValue | IBV_QP_RQ_PSN.rawValue
                | IBV_QP_MAX_DEST_RD_ATOMIC.rawValue | IBV_QP_MIN_RNR_TIMER.rawValue, "INIT->RTR")
    }

    /// RTR -> RTS with our first PSN. `timeout` is the local ACK timeout exponent
    /// (4.096 us * 2^timeout), retried `retries` times before IBV_WC_RETRY_EXC_ERR.
    package func toReadyToSend(packetSequenceNumber: UInt32, timeout: UInt8 = 14, retries: UInt8 = 7) throws(VerbsError) {
        var attr = ibv_qp_attr()
        attr.qp_state = IBV_QPS_RTS
        attr.timeout = timeout
        attr.retry_cnt = retries
        // Finite: FineMem posts no receives, so a receiver-not-ready NAK means the peer is
        // not serving (7 would retry it forever).
        attr.rnr_retry = 6
        attr.sq_psn = packetSequenceNumber
        attr.max_rd_atomic = UInt8(readAtomicDepth)
        try modify(
            &attr,
            IBV_QP_STATE.rawValue | IBV_QP_TIMEOUT.rawValue | IBV_QP_RETRY_CNT.rawValue | IBV_QP_RNR_RETRY.rawValue
                | IBV_QP_SQ_PSN.rawValue | IBV_QP_MAX_QP_RD_ATOMIC.rawValue, "RTR->RTS")
    }

    /// Moves the QP to the error state: outstanding work requests complete flushed, and
    /// requests arriving from the peer are dropped.
    package func toError() throws(VerbsError) {
        var attr = ibv_qp_attr()
        attr.qp_state = IBV_QPS_ERR
        try modify(&attr, IBV_QP_STATE.rawValue, "->ERR")
    }

    /// Moves the QP to RESET (from any state), ready to connect again.
    package func toReset() throws(VerbsError) {
        var attr = ibv_qp_attr()
        attr.qp_state = IBV_QPS_RESET
        try modify(&attr, IBV_QP_STATE.rawValue, "->RESET")
    }

    /// RESET -> INIT -> RTR -> RTS towards `remote`.
    package func connect(to remote: VerbsEndpoint, path: VerbsPath, localPSN: UInt32) throws(VerbsError) {
        try toInit(port: path.port)
        try toReadyToReceive(remote: remote, path: path)
        try toReadyToSend(packetSequenceNumber: localPSN)
    }

    /// This QP's side of the connection, over `path`.
    package func endpoint(path: VerbsPath, packetSequenceNumber: UInt32) -> VerbsEndpoint {
        VerbsEndpoint(queuePairNumber: number, lid: path.lid, gid: path.gid, packetSequenceNumber: packetSequenceNumber)
    }

    /// Posts a linked chain of send work requests (one doorbell).
    package func post(_ first: UnsafeMutablePointer<ibv_send_wr>) throws(VerbsError) {
        var bad: UnsafeMutablePointer<ibv_send_wr>?
        try verbsCheck(ibv_post_send(raw, first, &bad), "ibv_post_send")
    }
}

/// A page-aligned anonymous buffer registered for local access: the source of WRITEs and
/// the destination of READs and atomic replies, reused for every batch.
package final class VerbsSlab: @unchecked Sendable {
    package let bytes: UnsafeMutableRawPointer
    package let length: Int
    package let region: VerbsMemoryRegion

    package init(pd: VerbsProtectionDomain, length: Int) throws(VerbsError) {
        let page = Int(sysconf(Int32(_SC_PAGESIZE)))
        let rounded = (length + page - 1) / page * page
        guard let mapped = mmap(nil, rounded, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0), mapped != MAP_FAILED else {
            throw VerbsError(call: "mmap(\(rounded)) for a local slab", errno: finemem_errno())
        }
        do {
            region = try VerbsMemoryRegion(pd: pd, address: mapped, length: rounded, accessFlags: IBV_ACCESS_LOCAL_WRITE.rawValue)
        } catch {
            munmap(mapped, rounded)
            throw error
        }
        bytes = mapped
        self.length = rounded
    }

    deinit {
        try? region.deregister()
        munmap(bytes, length)
    }
}
