#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Atomics

/// An in-process emulation of the NIC of one memory node, over an `mmap`'ed pool.
///
/// The pool is reserved with `MAP_NORESERVE`: a 64 GiB pool costs nothing until touched.
/// Every verb is checked against the key table (memory regions and type-1 windows, 24-bit
/// index plus 8-bit tag), the bounds and the access rights; atomics are 8-byte aligned and
/// atomic against each other. Words that are 8-byte aligned are read and written with
/// atomic loads and stores, so readers never see a torn metadata word.
///
/// ```swift
/// let nic = try SimulatedNIC(node: NodeID(0), poolBytes: 64 << 20)
/// let pd = nic.allocateProtectionDomain()
/// let region = try nic.registerRegion(pd: pd, address: nic.baseAddress, length: 4096, access: .all)
/// let connection = nic.connect(from: NodeID(1), protectionDomain: pd)
/// try await connection.write(region.address, bytes: [1, 2, 3], rkey: region.rkey)
/// ```
package final class SimulatedNIC: NICControl, @unchecked Sendable {
    /// The memory node this NIC belongs to.
    package let node: NodeID
    /// The NIC address of the first byte of the pool.
    package let baseAddress: RemoteAddress
    /// Size of the pool in bytes.
    package let poolBytes: UInt64

    private let pool: UnsafeMutableRawPointer
    private let keys = Locked(KeyTable())
    /// Advanced after every change that can take a grant away or alter it (deregister,
    /// bind, invalidate): a connection's `KeyCache` holds grants only while it is unchanged,
    /// so a verb checks a key it used before without taking `keys`' lock.
    private let keyEpoch = ManagedAtomic<UInt64>(0)
    /// Set by `powerOff()`; read before every verb (an atomic, not a lock).
    private let poweredOff = ManagedAtomic<Bool>(false)
    /// The connections opened on this NIC, by protection domain, held weakly: what
    /// `breakConnections(of:)` moves to the error state.
    private let connections = Locked<[ProtectionDomain: [WeakConnection]]>([:])

    /// A connection the NIC knows without keeping it alive.
    private struct WeakConnection {
        weak var connection: SimulatedConnection?
    }

    private enum KeyEntry {
        case region(MemoryRegion)
        case window(WindowState)
    }

    private struct WindowState {
        var window: MemoryWindow
        var tag: UInt8
        var binding: (address: RemoteAddress, length: UInt64, access: RemoteAccess, region: UInt32)?
    }

    private struct KeyTable {
        var entries: [UInt32: KeyEntry] = [:]
        var nextIndex: UInt32 = 1
        var nextProtectionDomain: UInt32 = 1

        mutating func takeIndex() throws(NICControlError) -> UInt32 {
            guard nextIndex < 1 << 24 else { throw .keySpaceExhausted }
            defer { nextIndex += 1 }
            return nextIndex
        }
    }

    /// The default NIC address of a pool's first byte: not zero, so that a zero address is
    /// never valid, and the same on every run, so that simulated traces are reproducible.
    package static let defaultBaseAddress = RemoteAddress(1 << 40)

    /// The simulator whose virtual time the connections of `openConnection` run in; nil
    /// for immediate mode (real threads).
    package let simulator: Simulator?

    /// Maps a pool of `poolBytes` (rounded up to the page size) that the NIC serves.
    package init(
        node: NodeID, poolBytes: UInt64, simulator: Simulator? = nil, baseAddress: RemoteAddress = SimulatedNIC.defaultBaseAddress
    ) throws(NICControlError) {
        let page = UInt64(sysconf(Int32(_SC_PAGESIZE)))
        let length = (poolBytes + page - 1) / page * page
        let mapped = mmap(nil, Int(length), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        guard let mapped, mapped != MAP_FAILED else {
            throw .poolUnavailable(bytes: length)
        }
        self.simulator = simulator
        self.node = node
        self.baseAddress = baseAddress
        self.poolBytes = length
        self.pool = mapped
    }

    deinit {
        munmap(pool, Int(poolBytes))
    }

    // MARK: Memory node's local calls (the verbs control path)

    package func allocateProtectionDomain() -> ProtectionDomain {
        keys.withLock { table in
            defer { table.nextProtectionDomain += 1 }
            return ProtectionDomain(id: table.nextProtectionDomain)
        }
    }

    /// Registers `[address, address+length)` of the pool with remote `access` (`ibv_reg_mr`).
    package func registerRegion(
        pd: ProtectionDomain, address: RemoteAddress, length: UInt64, access: RemoteAccess
    ) throws(NICControlError) -> MemoryRegion {
        guard contains(address, length) else { throw .rangeOutsidePool(address: address, length: length) }
        return try keys.withLock { (table) throws(NICControlError) -> MemoryRegion in
            let index = try table.takeIndex()
            let region = MemoryRegion(
                rkey: RKey(index: index, tag: 0), address: address, length: length, access: access,
                protectionDomain: pd)
            table.entries[index] = .region(region)
            return region
        }
    }

    /// Deregisters a region (`ibv_dereg_mr`); refused while windows are bound to it. From
    /// then on its key is unknown: this is how a dead compute node is fenced.
    package func deregister(_ region: MemoryRegion) throws(NICControlError) {
        try keys.withLock { (table) throws(NICControlError) in
            guard case .region(let known)? = table.entries[region.rkey.index], known == region else {
                throw .noSuchRegion(region.rkey)
            }
            for case .window(let window) in table.entries.values where window.binding?.region == region.rkey.index {
                throw .regionHasBoundWindows(region.rkey)
            }
            table.entries[region.rkey.index] = nil
            keyEpoch.wrappingIncrement(ordering: .sequentiallyConsistent)
        }
    }

    /// Allocates an unbound type-1 window (`ibv_alloc_mw`).
    package func allocateWindow(pd: ProtectionDomain) throws(NICControlError) -> MemoryWindow {
        try keys.withLock { (table) throws(NICControlError) -> MemoryWindow in
            let index = try table.takeIndex()
            let window = MemoryWindow(index: index, protectionDomain: pd)
            table.entries[index] = .window(WindowState(window: window, tag: 0, binding: nil))
            return window
        }
    }

    /// Binds (or rebinds) `window` over part of `region` (`ibv_bind_mw`). The key's tag
    /// advances on every bind, so keys of earlier bindings stop working.
    package func bind(
        _ window: MemoryWindow, in region: MemoryRegion, address: RemoteAddress, length: UInt64, access: RemoteAccess
    ) throws(NICControlError) -> RKey {
        guard window.protectionDomain == region.protectionDomain else { throw .protectionDomainMismatch }
        guard address >= region.address, length > 0, address.rawValue + length <= region.address.rawValue + region.length else {
            throw .bindOutsideRegion(address: address, length: length)
        }
        guard region.access.isSuperset(of: access) else { throw .bindExceedsRegionAccess }
        return try keys.withLock { (table) throws(NICControlError) -> RKey in
            guard case .region? = table.entries[region.rkey.index] else { throw .noSuchRegion(region.rkey) }
            guard case .window(var state)? = table.entries[window.index] else { throw .noSuchWindow(window.index) }
            state.tag &+= 1
            state.binding = (address, length, access, region.rkey.index)
            table.entries[window.index] = .window(state)
            keyEpoch.wrappingIncrement(ordering: .sequentiallyConsistent)
            return RKey(index: window.index, tag: state.tag)
        }
    }

    /// Invalidates a window's binding (local invalidate); its key stops working at once.
    package func invalidate(_ window: MemoryWindow) throws(NICControlError) {
        try keys.withLock { (table) throws(NICControlError) in
            guard case .window(var state)? = table.entries[window.index] else { throw .noSuchWindow(window.index) }
            state.binding = nil
            table.entries[window.index] = .window(state)
            keyEpoch.wrappingIncrement(ordering: .sequentiallyConsistent)
        }
    }

    package func openConnection(from node: NodeID, protectionDomain pd: ProtectionDomain) -> any FabricConnection {
        connect(from: node, protectionDomain: pd, simulator: simulator)
    }

    /// The memory node's own connection. It crosses no network, so it executes each batch
    /// at once on the caller's thread (in virtual time too: in zero virtual time, without
    /// drawing from the simulator's random stream), with the same checks as any other.
    package func openLoopback(protectionDomain pd: ProtectionDomain) -> any FabricConnection {
        connect(from: node, protectionDomain: pd, simulator: nil)
    }

    /// Opens a reliable connection from `node` in protection domain `pd`, in the virtual
    /// time of `simulator` (immediate mode without one).
    package func connect(
        from node: NodeID, protectionDomain pd: ProtectionDomain, simulator: Simulator? = nil
    ) -> SimulatedConnection {
        let connection = SimulatedConnection(nic: self, localNode: node, protectionDomain: pd, simulator: simulator)
        connections.withLock { table in
            table[pd, default: []].removeAll { $0.connection == nil }
            table[pd, default: []].append(WeakConnection(connection: connection))
        }
        return connection
    }

    /// Moves every connection of `pd` opened so far to the error state (`IBV_QPS_ERR`):
    /// each of their verbs from now on, posted before or after, fails with
    /// `connectionBroken` and has no effect. A verb executing on another thread (immediate
    /// mode) finishes before this returns. Connections of other domains, and connections
    /// opened in `pd` later, keep working.
    package func breakConnections(of pd: ProtectionDomain) {
        let targets = connections.withLock { table in
            defer { table[pd] = nil }
            return (table[pd] ?? []).compactMap(\.connection)
        }
        for connection in targets { connection.breakConnection() }
    }

    /// Takes the memory node down: every verb from now on fails with `peerDead`, as
    /// completions fail with retry-exceeded when the remote host is gone. Its memory stays
    /// inspectable.
    package func powerOff() { poweredOff.store(true, ordering: .sequentiallyConsistent) }

    /// Whether `powerOff()` was called.
    package var isPoweredOff: Bool { poweredOff.load(ordering: .sequentiallyConsistent) }

    // MARK: Inspection (tests and invariant checkers; never used to change memory)

    /// Loads the 8-byte word at `address` atomically. For checkers only: protocol code
    /// reads through a connection.
    package func peekWord(_ address: RemoteAddress) -> UInt64 {
        precondition(contains(address, 8) && address.rawValue % 8 == 0, "peek outside pool or misaligned: \(address)")
        return atomicWord(address).load(ordering: .relaxed)
    }

    // MARK: The data path

    private func contains(_ address: RemoteAddress, _ length: UInt64) -> Bool {
        address >= baseAddress && length <= poolBytes && address.rawValue - baseAddress.rawValue <= poolBytes - length
    }

    private func pointer(_ address: RemoteAddress) -> UnsafeMutableRawPointer {
        pool + Int(address.rawValue - baseAddress.rawValue)
    }

    private func atomicWord(_ address: RemoteAddress) -> UnsafeAtomic<UInt64> {
        UnsafeAtomic<UInt64>(at: pointer(address).assumingMemoryBound(to: UInt64.AtomicRepresentation.self))
    }

    /// What a key grants: where, how far, which access.
    struct Grant {
        let address: RemoteAddress
        let length: UInt64
        let access: RemoteAccess
    }

    /// The grants of the two keys one connection used last (a pool's metadata key and its
    /// data key, typically), with the key epoch they were looked up in: while the epoch
    /// is unchanged no key was deregistered, rebound or invalidated, so they still hold.
    /// The connection keeps it under its own lock.
    struct KeyCache {
        fileprivate var epoch = UInt64.max
        fileprivate var first: (rkey: RKey, grant: Grant)?
        fileprivate var second: (rkey: RKey, grant: Grant)?

        fileprivate subscript(rkey: RKey) -> Grant? {
            if let first, first.rkey == rkey { return first.grant }
            if let second, second.rkey == rkey { return second.grant }
            return nil
        }

        fileprivate mutating func insert(_ grant: Grant, for rkey: RKey) {
            second = first
            first = (rkey, grant)
        }
    }

    /// Checks `verb` against the key table in `pd` (`cache`: as for a word batch's entry).
    func authorize(_ verb: Verb, pd: ProtectionDomain, cache: inout KeyCache) -> RemoteAccessViolation? {
        let needed: RemoteAccess
        let length: Int
        switch verb {
        case .read(_, let readLength, _, _): needed = .read; length = readLength
        case .write(_, let bytes, _, _): needed = .write; length = bytes.count
        case .compareAndSwap, .fetchAndAdd: needed = .atomic; length = 8
        }
        return authorize(needed: needed, length: length, atomic: verb.kind.isAtomic, address: verb.address, rkey: verb.rkey, pd: pd, cache: &cache)
    }

    /// Checks a READ or WRITE of `length` bytes at `address` against the key table in `pd`.
    func authorize(_ needed: RemoteAccess, length: Int, address: RemoteAddress, rkey: RKey, pd: ProtectionDomain, cache: inout KeyCache) -> RemoteAccessViolation? {
        authorize(needed: needed, length: length, atomic: false, address: address, rkey: rkey, pd: pd, cache: &cache)
    }

    /// Checks an 8-byte verb of a `WordBatch` against the key table in `pd`. `cache` is the
    /// connection's (every connection has one protection domain): a key it holds is
    /// checked without the key table's lock.
    func authorize(_ entry: WordBatch.Entry, pd: ProtectionDomain, cache: inout KeyCache) -> RemoteAccessViolation? {
        let atomic = entry.kind != .read
        return authorize(needed: atomic ? .atomic : .read, length: 8, atomic: atomic, address: entry.address, rkey: entry.rkey, pd: pd, cache: &cache)
    }

    /// Checks an access of `length` bytes at `address` with `rkey` in `pd`.
    private func authorize(
        needed: RemoteAccess, length: Int, atomic: Bool, address: RemoteAddress, rkey: RKey, pd: ProtectionDomain, cache: inout KeyCache
    ) -> RemoteAccessViolation? {
        guard length > 0 else { return .invalidLength }
        if atomic, address.rawValue % 8 != 0 { return .misalignedAtomic }
        // The epoch is loaded before the look-up: a grant cached under it was looked up no
        // earlier than that, so a change after the load shows as a new epoch next time.
        let epoch = keyEpoch.load(ordering: .sequentiallyConsistent)
        if cache.epoch != epoch { cache = KeyCache(epoch: epoch) }
        let granted: Grant
        if let cached = cache[rkey] {
            granted = cached
        } else {
            switch lookUp(rkey, pd: pd) {
            case .success(let grant):
                cache.insert(grant, for: rkey)
                granted = grant
            case .failure(let violation): return violation
            }
        }
        guard address >= granted.address, UInt64(length) <= granted.length,
              address.rawValue - granted.address.rawValue <= granted.length - UInt64(length)
        else { return .outOfBounds }
        guard granted.access.contains(needed) else { return .permissionDenied(needed: needed) }
        return nil
    }

    /// What `rkey` grants in `pd` now, from the key table.
    private func lookUp(_ rkey: RKey, pd: ProtectionDomain) -> Result<Grant, RemoteAccessViolation> {
        keys.withLock { table in
            switch table.entries[rkey.index] {
            case .region(let region)?:
                guard region.protectionDomain == pd, rkey.tag == region.rkey.tag else { return .failure(.unknownKey) }
                return .success(Grant(address: region.address, length: region.length, access: region.access))
            case .window(let state)?:
                guard state.window.protectionDomain == pd else { return .failure(.unknownKey) }
                guard let binding = state.binding else { return .failure(.windowInvalidated) }
                guard state.tag == rkey.tag else { return .failure(.staleKey) }
                return .success(Grant(address: binding.address, length: binding.length, access: binding.access))
            case nil:
                return .failure(.unknownKey)
            }
        }
    }

    /// Performs an authorized 8-byte verb of a `WordBatch`; answers the word read, or the
    /// original value of an atomic.
    func perform(_ entry: WordBatch.Entry) -> UInt64 {
        let word = atomicWord(entry.address)
        switch entry.kind {
        case .read:
            return word.load(ordering: .relaxed)
        case .compareAndSwap:
            return word.compareExchange(expected: entry.operand, desired: entry.desired, ordering: .sequentiallyConsistent).original
        case .fetchAndAdd:
            return word.loadThenWrappingIncrement(by: entry.operand, ordering: .sequentiallyConsistent)
        }
    }

    /// Performs an authorized 8-byte verb (a READ of 8 bytes, a compare-and-swap or a
    /// fetch-and-add) as `perform(_:)` does; answers the word read (little-endian, as
    /// `VerbResult.words` decodes it), or the original value of an atomic.
    func performWord(_ verb: Verb) -> UInt64 {
        switch verb {
        case .read(let address, let length, _, _):
            precondition(length == 8, "a word READ reads 8 bytes, not \(length)")
            guard address.rawValue % 8 == 0 else { return UInt64(littleEndian: UnsafeRawPointer(pointer(address)).loadUnaligned(as: UInt64.self)) }
            return atomicWord(address).load(ordering: .relaxed)
        case .compareAndSwap(let address, let expected, let desired, _, _):
            return atomicWord(address).compareExchange(expected: expected, desired: desired, ordering: .sequentiallyConsistent).original
        case .fetchAndAdd(let address, let delta, _, _):
            return atomicWord(address).loadThenWrappingIncrement(by: delta, ordering: .sequentiallyConsistent)
        case .write:
            preconditionFailure("a WRITE answers no word")
        }
    }

    /// Performs an authorized verb on the pool.
    func perform(_ verb: Verb) -> VerbResult {
        switch verb {
        case .read(let address, let length, _, _):
            var bytes = [UInt8](repeating: 0, count: length)
            bytes.withUnsafeMutableBytes { copy(from: address, into: $0) }
            return .read(bytes)
        case .write(let address, let bytes, _, _):
            bytes.withUnsafeBytes { copy($0, to: address) }
            return .written
        case .compareAndSwap(let address, let expected, let desired, _, _):
            let (exchanged, original) = atomicWord(address).compareExchange(
                expected: expected, desired: desired, ordering: .sequentiallyConsistent)
            return .compareAndSwap(exchanged: exchanged, original: original)
        case .fetchAndAdd(let address, let delta, _, _):
            let original = atomicWord(address).loadThenWrappingIncrement(by: delta, ordering: .sequentiallyConsistent)
            return .fetchAndAdd(original: original)
        }
    }

    /// Copies the pool's bytes at `address` (authorized) into `destination`: word by word
    /// with atomic loads when aligned (a READ racing with atomics on the same words sees
    /// each word whole, as on a NIC), else as plain bytes.
    func copy(from address: RemoteAddress, into destination: UnsafeMutableRawBufferPointer) {
        let length = destination.count
        if address.rawValue % 8 == 0, length % 8 == 0 {
            for offset in stride(from: 0, to: length, by: 8) {
                let word = atomicWord(address + UInt64(offset)).load(ordering: .relaxed)
                destination.storeBytes(of: word.littleEndian, toByteOffset: offset, as: UInt64.self)
            }
        } else {
            destination.copyMemory(from: UnsafeRawBufferPointer(start: pointer(address), count: length))
        }
    }

    /// Copies `source` into the pool at `address` (authorized), as `copy(from:into:)` reads.
    func copy(_ source: UnsafeRawBufferPointer, to address: RemoteAddress) {
        if address.rawValue % 8 == 0, source.count % 8 == 0 {
            for offset in stride(from: 0, to: source.count, by: 8) {
                let word = UInt64(littleEndian: source.loadUnaligned(fromByteOffset: offset, as: UInt64.self))
                atomicWord(address + UInt64(offset)).store(word, ordering: .relaxed)
            }
        } else if let base = source.baseAddress {
            pointer(address).copyMemory(from: base, byteCount: source.count)
        }
    }
}
