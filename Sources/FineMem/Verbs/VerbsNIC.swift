import CVerbs
#if canImport(Glibc)
import Glibc
#endif

/// The NIC of a memory node on a real RDMA device: the `NICControl` protocol over
/// libibverbs, serving a pool mapped in this process.
///
/// - The pool is `mmap`'ed with 2 MiB huge pages when enough are reserved (no
///   `MAP_NORESERVE`: a huge-page mapping without a reservation cannot be pinned), else with
///   ordinary pages (and a line on standard error saying so). NIC addresses are the pool's
///   virtual addresses (regions are registered with `iova` = address).
/// - A protection domain per `allocateProtectionDomain()` (the memory node takes one per
///   compute node and one for itself), regions registered without relaxed ordering.
/// - Type-1 windows, bound and unbound (`ibv_bind_mw` with length 0, the region given) on a
///   control queue pair of the window's domain: a loopback RC QP pair that only the memory
///   node posts on.
/// - `openConnection` creates an RC QP pair over the device's own GID: the responder in the
///   compute node's domain, the requester (with its slab) in a domain of its own, as a
///   compute node in another process would have; `openLoopback` does the same inside the
///   memory node's domain. `breakConnections` moves both QPs of each of the domain's
///   connections to the error state.
///
/// At start it reads the device's limits and refuses a device that cannot host the pool:
/// no remote atomics, fewer windows than the pool needs, no memory windows at all, or
/// atomics that do not apply to little-endian words (measured with one fetch-and-add on
/// the loopback).
package final class VerbsNIC: NICControl, @unchecked Sendable {
    package let node: NodeID
    package let baseAddress: RemoteAddress
    package let poolBytes: UInt64
    package let context: VerbsContext
    package let path: VerbsPath
    /// Whether the pool sits on huge pages.
    package let hugePages: Bool
    private let pool: UnsafeMutableRawPointer
    private let mappedBytes: Int
    private let state = Locked(State())

    private struct Domain {
        let pd: VerbsProtectionDomain
        var control: VerbsConnection?
        var connections: [WeakVerbsConnection] = []
        var responders: [VerbsRemoteResponder] = []
    }

    private struct WeakVerbsConnection {
        weak var connection: VerbsConnection?
    }

    private struct State {
        var domains: [UInt32: Domain] = [:]
        var regions: [UInt32: VerbsMemoryRegion] = [:]
        var windows: [UInt32: VerbsMemoryWindow] = [:]
        var nextDomain: UInt32 = 1
        var nextWindow: UInt32 = 1
    }

    /// Opens `device`, checks it can host a pool that needs `windows` memory windows and
    /// `regions` regions, and maps a pool of `poolBytes`. `log` receives the lines a
    /// memory node prints at start (huge pages, the atomic capability).
    package init(
        device: String, node: NodeID, poolBytes: UInt64, windows: Int, regions: Int,
        log: @Sendable (String) -> Void = verbsStandardError
    ) throws(NICControlError) {
        let context: VerbsContext
        do { context = try VerbsContext(device: device) } catch { throw .device("\(error)") }
        let limits = context.limits
        switch limits.atomics {
        case .none:
            throw .device("\(device) has no remote atomics (atomic_cap NONE): FineMem changes every metadata word with RDMA atomics")
        case .hca:
            log("\(device): atomic_cap HCA: RDMA atomics are atomic only against other RDMA atomics through this NIC; the memory node changes metadata through a loopback QP, never by CPU stores")
        case .global:
            break
        }
        if windows > 0 && !limits.memoryWindows {
            throw .device("\(device) has no memory windows (IBV_DEVICE_MEM_WINDOW not set), the pool needs \(windows)")
        }
        if windows > limits.maxMemoryWindows {
            throw .device("the pool needs \(windows) memory windows (a main and a backup key per 4 KiB chunk), \(device) allows max_mw = \(limits.maxMemoryWindows): use a smaller pool")
        }
        if regions > limits.maxMemoryRegions {
            throw .device("the pool needs \(regions) memory regions, \(device) allows max_mr = \(limits.maxMemoryRegions)")
        }
        do { path = try VerbsPath.choose(context: context) } catch { throw .device("\(error)") }
        self.context = context
        self.node = node

        let huge = 2 << 20
        var length = Int((poolBytes + UInt64(huge) - 1) / UInt64(huge)) * huge
        var mapped = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB, -1, 0)
        if let mapped, mapped != MAP_FAILED {
            hugePages = true
        } else {
            let reason = String(cString: strerror(finemem_errno()))
            let page = Int(sysconf(Int32(_SC_PAGESIZE)))
            length = Int((poolBytes + UInt64(page) - 1) / UInt64(page)) * page
            mapped = mmap(nil, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
            guard let mapped, mapped != MAP_FAILED else { throw .poolUnavailable(bytes: UInt64(length)) }
            log("\(device): no 2 MiB huge pages for the \(length >> 20) MiB pool (\(reason)): using \(page / 1024) KiB pages")
            hugePages = false
        }
        pool = mapped!
        mappedBytes = length
        self.poolBytes = UInt64(length)
        baseAddress = RemoteAddress(UInt64(UInt(bitPattern: pool)))
        try checkAtomicByteOrder()
    }

    deinit {
        // Connections, windows and regions go before the pool is unmapped.
        state.withLock { $0 = State() }
        munmap(pool, mappedBytes)
    }

    /// One fetch-and-add through the loopback on the pool's first word, written as
    /// little-endian bytes: the device must add to it as a little-endian integer.
    private func checkAtomicByteOrder() throws(NICControlError) {
        let pd = try allocateProtectionDomain()
        let region = try registerRegion(pd: pd, address: baseAddress, length: 8, access: .all)
        defer { try? deregister(region) }
        let connection = try openLoopbackConnection(pd: pd)
        pool.storeBytes(of: UInt64(0x0102_0304_0506_0708).littleEndian, as: UInt64.self)
        let verbs: [Verb] = [.fetchAndAdd(baseAddress, delta: 1, rkey: region.rkey), .read(baseAddress, length: 8, rkey: region.rkey)]
        let outcome = Result { () throws(FabricError) in try connection.postSynchronously(verbs) }
        pool.storeBytes(of: 0, as: UInt64.self)
        switch outcome {
        case .failure(let error):
            throw .device("a fetch-and-add on the loopback failed: \(error)")
        case .success(let results):
            guard case .fetchAndAdd(let original) = results[0], original == 0x0102_0304_0506_0708,
                  results[1].words == [0x0102_0304_0506_0709]
            else {
                throw .device("\(context.name) applies atomics in another byte order than the host's (answers \(results)): FineMem's words are little-endian")
            }
        }
    }

    // MARK: NICControl

    package func allocateProtectionDomain() throws(NICControlError) -> ProtectionDomain {
        let pd: VerbsProtectionDomain
        do { pd = try VerbsProtectionDomain(context: context) } catch { throw .device("\(error)") }
        return state.withLock { s in
            defer { s.nextDomain += 1 }
            s.domains[s.nextDomain] = Domain(pd: pd)
            return ProtectionDomain(id: s.nextDomain)
        }
    }

    private func domain(_ pd: ProtectionDomain) throws(NICControlError) -> VerbsProtectionDomain {
        guard let domain = state.withLock({ $0.domains[pd.id]?.pd }) else { throw .device("no protection domain \(pd.id)") }
        return domain
    }

    private func contains(_ address: RemoteAddress, _ length: UInt64) -> Bool {
        address >= baseAddress && length <= poolBytes && address.rawValue - baseAddress.rawValue <= poolBytes - length
    }

    package func registerRegion(pd: ProtectionDomain, address: RemoteAddress, length: UInt64, access: RemoteAccess) throws(NICControlError) -> MemoryRegion {
        guard contains(address, length) else { throw .rangeOutsidePool(address: address, length: length) }
        let domain = try domain(pd)
        let region: VerbsMemoryRegion
        do {
            region = try VerbsMemoryRegion(
                pd: domain, address: UnsafeMutableRawPointer(bitPattern: UInt(address.rawValue))!, length: Int(length),
                accessFlags: verbsAccessFlags(access, localWrite: true, bindable: true))
        } catch { throw .device("\(error)") }
        state.withLock { $0.regions[region.rkey] = region }
        return MemoryRegion(rkey: RKey(rawValue: region.rkey), address: address, length: length, access: access, protectionDomain: pd)
    }

    package func deregister(_ region: MemoryRegion) throws(NICControlError) {
        try state.withLock { (s) throws(NICControlError) in
            guard let registered = s.regions[region.rkey.rawValue] else { throw .noSuchRegion(region.rkey) }
            if s.windows.values.contains(where: { $0.boundRegion === registered }) { throw .regionHasBoundWindows(region.rkey) }
            do { try registered.deregister() } catch { throw .device("\(error)") }
            s.regions[region.rkey.rawValue] = nil
        }
    }

    package func allocateWindow(pd: ProtectionDomain) throws(NICControlError) -> MemoryWindow {
        let domain = try domain(pd)
        let window: VerbsMemoryWindow
        do { window = try VerbsMemoryWindow(pd: domain, kind: .type1) } catch { throw .device("\(error)") }
        return state.withLock { s in
            defer { s.nextWindow += 1 }
            s.windows[s.nextWindow] = window
            return MemoryWindow(index: s.nextWindow, protectionDomain: pd)
        }
    }

    /// The control QP of `pd` (opened on first use), on which binds are posted.
    private func control(_ pd: ProtectionDomain) throws(NICControlError) -> VerbsConnection {
        if let existing = state.withLock({ $0.domains[pd.id]?.control }) { return existing }
        let connection = try openLoopbackConnection(pd: pd)
        return state.withLock { s in
            if let existing = s.domains[pd.id]?.control { return existing }
            s.domains[pd.id]?.control = connection
            return connection
        }
    }

    package func bind(_ window: MemoryWindow, in region: MemoryRegion, address: RemoteAddress, length: UInt64, access: RemoteAccess) throws(NICControlError) -> RKey {
        guard window.protectionDomain == region.protectionDomain else { throw .protectionDomainMismatch }
        guard address >= region.address, length > 0, address.rawValue + length <= region.address.rawValue + region.length else {
            throw .bindOutsideRegion(address: address, length: length)
        }
        guard region.access.isSuperset(of: access) else { throw .bindExceedsRegionAccess }
        let (mw, mr) = state.withLock { ($0.windows[window.index], $0.regions[region.rkey.rawValue]) }
        guard let mw else { throw .noSuchWindow(window.index) }
        guard let mr else { throw .noSuchRegion(region.rkey) }
        let control = try control(window.protectionDomain)
        do {
            let key = try control.bindType1(mw, region: mr, address: address.rawValue, length: length, accessFlags: verbsAccessFlags(access, localWrite: false, bindable: false))
            state.withLock { _ in mw.boundRegion = mr }
            return RKey(rawValue: key)
        } catch { throw .device("\(error)") }
    }

    package func invalidate(_ window: MemoryWindow) throws(NICControlError) {
        guard let mw = state.withLock({ $0.windows[window.index] }) else { throw .noSuchWindow(window.index) }
        guard let region = state.withLock({ _ in mw.boundRegion }) else { return }
        let control = try control(window.protectionDomain)
        do {
            _ = try control.bindType1(mw, region: region, address: 0, length: 0, accessFlags: 0)
            state.withLock { _ in mw.boundRegion = nil }
        } catch { throw .device("\(error)") }
    }

    private func openLoopbackConnection(pd: ProtectionDomain) throws(NICControlError) -> VerbsConnection {
        let domain = try domain(pd)
        do {
            return try VerbsConnection.loopbackPair(requesterPD: domain, responderPD: domain, path: path, remoteNode: node)
        } catch { throw .connectionFailed("\(error)") }
    }

    private func remember(_ connection: VerbsConnection, in pd: ProtectionDomain) {
        state.withLock { s in
            s.domains[pd.id]?.connections.removeAll { $0.connection == nil }
            s.domains[pd.id]?.connections.append(WeakVerbsConnection(connection: connection))
        }
    }

    package func openConnection(from node: NodeID, protectionDomain pd: ProtectionDomain) throws(NICControlError) -> any FabricConnection {
        let responderDomain = try domain(pd)
        let connection: VerbsConnection
        do {
            let requesterDomain = try VerbsProtectionDomain(context: context)
            connection = try VerbsConnection.loopbackPair(requesterPD: requesterDomain, responderPD: responderDomain, path: path, remoteNode: self.node)
        } catch { throw .connectionFailed("\(error)") }
        remember(connection, in: pd)
        return connection
    }

    package func openLoopback(protectionDomain pd: ProtectionDomain) throws(NICControlError) -> any FabricConnection {
        let connection = try openLoopbackConnection(pd: pd)
        remember(connection, in: pd)
        return connection
    }

    /// Creates a responder QP in `pd` for a compute node in another process and connects it
    /// to `remote` (bootstrap over TCP); answers this side's endpoint. The QP is broken with
    /// the domain's connections.
    package func acceptRemote(_ remote: VerbsEndpoint, protectionDomain pd: ProtectionDomain) throws(NICControlError) -> (VerbsEndpoint, VerbsRemoteResponder) {
        let domain = try domain(pd)
        do {
            let cq = try VerbsCompletionQueue(context: context, entries: 16)
            let qp = try VerbsQueuePair(pd: domain, cq: cq, sendQueueDepth: 16)
            let psn = UInt32.random(in: 0..<(1 << 24))
            try qp.connect(to: remote, path: path, localPSN: psn)
            let responder = VerbsRemoteResponder(queuePair: qp)
            state.withLock { s in s.domains[pd.id]?.responders.append(responder) }
            return (qp.endpoint(path: path, packetSequenceNumber: psn), responder)
        } catch { throw .connectionFailed("\(error)") }
    }

    package func breakConnections(of pd: ProtectionDomain) throws(NICControlError) {
        let (targets, responders) = state.withLock { s -> ([VerbsConnection], [VerbsRemoteResponder]) in
            defer {
                s.domains[pd.id]?.connections = []
                s.domains[pd.id]?.responders = []
            }
            return ((s.domains[pd.id]?.connections ?? []).compactMap(\.connection), s.domains[pd.id]?.responders ?? [])
        }
        for connection in targets { connection.breakConnection() }
        for responder in responders { try? responder.queuePair.toError() }
    }

    // MARK: Inspection (checkers only)

    /// Loads the 8-byte word at `address` with a CPU load. For checkers of a quiescent
    /// pool only: protocol code reads through a connection.
    package func peekWord(_ address: RemoteAddress) -> UInt64 {
        precondition(contains(address, 8) && address.rawValue % 8 == 0, "peek outside pool or misaligned: \(address)")
        return UInt64(littleEndian: UnsafeRawPointer(bitPattern: UInt(address.rawValue))!.load(as: UInt64.self))
    }
}

/// A responder QP serving a compute node in another process.
package final class VerbsRemoteResponder: @unchecked Sendable {
    package let queuePair: VerbsQueuePair
    init(queuePair: VerbsQueuePair) { self.queuePair = queuePair }
}

/// Writes a line to standard error (the memory node's start-up notes).
package func verbsStandardError(_ line: String) {
    var text = line + "\n"
    text.withUTF8 { bytes in _ = write(2, bytes.baseAddress, bytes.count) }
}
