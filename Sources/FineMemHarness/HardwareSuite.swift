import CVerbs

import FineMem

#if canImport(Glibc)
import Glibc
#endif

/// The outcome of one check of the hardware suite.
package enum HardwareCheckOutcome: Sendable, Hashable {
    case passed(String)
    case failed(String)
    case skipped(String)
}

/// One check of the hardware suite and what came of it.
package struct HardwareCheck: Sendable, Hashable {
    package var name: String
    package var outcome: HardwareCheckOutcome
}

/// A check that does not hold.
private struct CheckFailure: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

/// A check that cannot be made on this device.
private struct CheckSkipped: Error, CustomStringConvertible {
    let description: String
    init(_ description: String) { self.description = description }
}

private func expect(_ condition: Bool, _ message: @autoclosure () -> String) throws {
    if !condition { throw CheckFailure(message()) }
}

/// The verbs backend against a real RDMA device (Soft-RoCE in CI's VM, or a ConnectX
/// card): the queue pair state machine, every verb, batches, fences, byte order, every
/// access error and the error state, breaking connections, type-1 and type-2 windows, the
/// TCP bootstrap, the allocator's fill-and-drain and mixed workloads with the pool's
/// invariants checked (`PoolInspector`), and a comparison with the simulated NIC.
/// `finemem hardware-suite` runs it; each check passes, fails or is skipped with a reason.
package struct HardwareSuite: Sendable {
    package let device: String

    package init(device: String) { self.device = device }

    /// Runs every check in order, handing each result to `report` as it is known.
    package func run(report: @Sendable (HardwareCheck) -> Void) async -> [HardwareCheck] {
        var results: [HardwareCheck] = []
        for (name, body) in checks {
            let outcome: HardwareCheckOutcome
            do {
                outcome = .passed(try await body())
            } catch let skip as CheckSkipped {
                outcome = .skipped(skip.description)
            } catch {
                outcome = .failed("\(error)")
            }
            let check = HardwareCheck(name: name, outcome: outcome)
            report(check)
            results.append(check)
        }
        return results
    }

    private var checks: [(String, () async throws -> String)] {
        [
            ("device limits and capabilities", deviceLimits),
            ("a pool the device cannot host is refused with the reason", unhostablePool),
            ("queue pair state machine RESET->INIT->RTR->RTS->ERR->RESET->RTS", stateMachine),
            ("every verb: WRITE, READ, CAS (match, mismatch), FAA (wrapping)", everyVerb),
            ("atomics on little-endian words (byte order)", byteOrder),
            ("a batch of 64 verbs on one doorbell, answers in order", batch),
            ("a batch longer than the send queue and larger than the slab", longBatch),
            ("fenced WRITE after CAS and READ on one connection", fenceOrdering),
            ("unknown rkey: remote access error, both QPs in ERR, connection stays broken", unknownKey),
            ("WRITE to a read-only region, atomic on a region without atomics, READ past a region", accessRights),
            ("misaligned atomic and zero-length verb", malformedVerbs),
            ("breakConnections: the domain's QPs to ERR, other domains and new connections work", breakConnections),
            ("type-1 window: bind, access, rebind (rkey rotation), unbind, region kept while bound", type1Windows),
            ("type-1 window bounds and rights", windowBounds),
            ("type-2 window: bind on the responder QP, LOCAL_INV, rebind", type2Windows),
            ("TCP bootstrap: QP number, GID, PSN and grant exchanged; errors name the step", { try await bootstrap(fence: false) }),
            ("a compute node connected over TCP is fenced by breakConnections", { try await bootstrap(fence: true) }),
            ("allocator fill-and-drain on verbs, invariants checked", fillAndDrain),
            ("allocator mixed workload on verbs (2 compute nodes x 2 tasks), invariants checked", mixedWorkload),
            ("a compute node fenced mid-free is recovered on verbs; its slot reused by a new incarnation", recovery),
            ("same seeded workload on the simulated NIC and on the device: same blocks", comparison),
        ]
    }

    // MARK: Fixtures

    /// A memory-node NIC on the device with a small pool.
    private func makeNIC(poolBytes: UInt64 = 4 << 20) throws -> VerbsNIC {
        try VerbsNIC(device: device, node: NodeID(0), poolBytes: poolBytes, windows: 64, regions: 64, log: { _ in })
    }

    private struct Fixture {
        let nic: VerbsNIC
        let pd: ProtectionDomain
        let region: MemoryRegion
        func connect() throws -> VerbsConnection {
            try nic.openConnection(from: NodeID(1001), protectionDomain: pd) as! VerbsConnection
        }
    }

    /// A NIC, a domain, a region over the first MiB of the pool with every right.
    private func fixture() throws -> Fixture {
        let nic = try makeNIC()
        let pd = try nic.allocateProtectionDomain()
        let region = try nic.registerRegion(pd: pd, address: nic.baseAddress, length: 1 << 20, access: .all)
        return Fixture(nic: nic, pd: pd, region: region)
    }

    /// Posts `verbs` and expects a remote access error of `violation` at `index`, then a
    /// broken connection with both QPs in the error state.
    private func expectAccessError(
        _ connection: VerbsConnection, _ verbs: [Verb], _ violations: Set<RemoteAccessViolation>, at index: Int
    ) async throws -> String {
        do {
            _ = try await connection.post(verbs)
            throw CheckFailure("the batch succeeded, expected \(violations) at verb \(index)")
        } catch let error as FabricError {
            guard case .remoteAccess(let violation, _, _, let at) = error, violations.contains(violation), at == index else {
                throw CheckFailure("expected \(violations) at verb \(index), got \(error)")
            }
            try await expectBroken(connection)
            return "\(violation)"
        }
    }

    private func expectBroken(_ connection: VerbsConnection) async throws {
        do {
            _ = try await connection.post([.read(RemoteAddress(8), length: 8, rkey: RKey(rawValue: 0))])
            throw CheckFailure("a verb after the error succeeded")
        } catch let error as FabricError {
            try expect(error == .connectionBroken(connection.remoteNode), "after the error: \(error), expected connectionBroken")
        }
        try expect(connection.queuePair.state == .error, "requester QP is \(connection.queuePair.state), not ERR")
        if let peer = connection.peer { try expect(peer.state == .error, "responder QP is \(peer.state), not ERR") }
    }

    // MARK: Checks

    private func deviceLimits() async throws -> String {
        let context = try VerbsContext(device: device)
        let limits = context.limits
        try expect(limits.atomics != .none, "no remote atomics")
        try expect(limits.memoryWindows, "no memory windows")
        try expect(limits.maxMemoryWindows > 0 && limits.maxQueuePairs > 0 && limits.maxMemoryRegions > 0, "zero limits: \(limits)")
        let path = try VerbsPath.choose(context: context)
        let port = try context.port(path.port)
        try expect(port.active, "port \(path.port) is \(port.state)")
        let gid = port.gids.first { $0.index == path.gidIndex }
        return "atomics \(limits.atomics == .hca ? "HCA" : "GLOB"), max_mw \(limits.maxMemoryWindows), max_qp \(limits.maxQueuePairs), max_mr \(limits.maxMemoryRegions), max_qp_rd_atom \(limits.maxResponderReadAtomic), type 2A/2B \(limits.windowType2A)/\(limits.windowType2B), \(port.linkLayer), \(gid.map(\.description) ?? "LID \(port.lid)")"
    }

    private func unhostablePool() async throws -> String {
        let maxWindows = try VerbsContext(device: device).limits.maxMemoryWindows
        do {
            _ = try VerbsNIC(device: device, node: NodeID(0), poolBytes: 1 << 20, windows: maxWindows + 1, regions: 4, log: { _ in })
            throw CheckFailure("a NIC needing \(maxWindows + 1) windows opened")
        } catch let error as NICControlError {
            guard case .device(let why) = error, why.contains("max_mw = \(maxWindows)") else { throw CheckFailure("refused with: \(error)") }
        }
        // The capability table of a pool has a main and a backup key per 4 KiB chunk.
        let chunks = (maxWindows / 2 + 1)
        let poolBytes = UInt64((chunks + 511) / 512 * 512) * PoolGeometry.chunkBytes
        do {
            _ = try await EmbeddedCluster.start(.init(memoryNodes: 1, poolBytesPerNode: poolBytes, computeNodes: 1, fabric: .verbs(device: device)))
            throw CheckFailure("a cluster of \(poolBytes >> 20) MiB started")
        } catch let error as ClusterError {
            guard case .memoryNodeFailed(_, let reason) = error, reason.contains("max_mw") else { throw CheckFailure("refused with: \(error)") }
            return "\(poolBytes >> 20) MiB pool refused: \(reason)"
        }
    }

    private func stateMachine() async throws -> String {
        let nic = try makeNIC()
        let context = nic.context
        let pd = try VerbsProtectionDomain(context: context)
        let a = try VerbsQueuePair(pd: pd, cq: VerbsCompletionQueue(context: context, entries: 64), sendQueueDepth: 16)
        let b = try VerbsQueuePair(pd: pd, cq: VerbsCompletionQueue(context: context, entries: 64), sendQueueDepth: 16)
        let path = nic.path
        var seen: [VerbsQueuePairState] = [a.state]
        try a.toInit(port: path.port)
        seen.append(a.state)
        try a.toReadyToReceive(remote: b.endpoint(path: path, packetSequenceNumber: 100), path: path)
        seen.append(a.state)
        try a.toReadyToSend(packetSequenceNumber: 200)
        seen.append(a.state)
        try b.connect(to: a.endpoint(path: path, packetSequenceNumber: 200), path: path, localPSN: 100)
        try expect(seen == [.reset, .initialized, .readyToReceive, .readyToSend], "states \(seen)")
        try expect(b.state == .readyToSend, "peer is \(b.state)")
        let buffer = try VerbsSlab(pd: pd, length: 4096)
        let remote = try VerbsMemoryRegion(pd: pd, address: buffer.bytes, length: 4096, accessFlags: verbsAccessFlags(.all, localWrite: true, bindable: false))
        let address = RemoteAddress(UInt64(UInt(bitPattern: buffer.bytes)))
        let first = try VerbsConnection(remoteNode: NodeID(0), queuePair: a, peer: b)
        try await first.write(address, bytes: [1, 2, 3, 4, 5, 6, 7, 8], rkey: RKey(rawValue: remote.rkey))
        try a.toError()
        try expect(a.state == .error, "after ->ERR: \(a.state)")
        try a.toReset()
        try b.toReset()
        try expect(a.state == .reset && b.state == .reset, "after ->RESET: \(a.state), \(b.state)")
        try a.connect(to: b.endpoint(path: path, packetSequenceNumber: 300), path: path, localPSN: 400)
        try b.connect(to: a.endpoint(path: path, packetSequenceNumber: 400), path: path, localPSN: 300)
        let second = try VerbsConnection(remoteNode: NodeID(0), queuePair: a, peer: b)
        let back = try await second.read(address, length: 8, rkey: RKey(rawValue: remote.rkey))
        try expect(back == [1, 2, 3, 4, 5, 6, 7, 8], "read after reconnecting: \(back)")
        return "states \(seen.count + 2) as expected; a verb works after ERR -> RESET -> RTS"
    }

    private func everyVerb() async throws -> String {
        let f = try fixture()
        let c = try f.connect()
        let base = f.region.address
        let key = f.region.rkey
        let pattern = (0..<64).map { UInt8($0 * 3 & 0xff) }
        try await c.write(base + 64, bytes: pattern, rkey: key)
        try expect(try await c.read(base + 64, length: 64, rkey: key) == pattern, "READ does not return the WRITE")
        try await c.write(base + 256, bytes: UInt64(41).littleEndianBytes, rkey: key)
        let hit = try await c.compareAndSwap(base + 256, expected: 41, desired: 42, rkey: key)
        try expect(hit == (true, 41), "CAS match answered \(hit)")
        let miss = try await c.compareAndSwap(base + 256, expected: 41, desired: 43, rkey: key)
        try expect(miss == (false, 42), "CAS mismatch answered \(miss)")
        let added = try await c.fetchAndAdd(base + 256, delta: 8, rkey: key)
        try expect(added == 42, "FAA answered \(added)")
        try await c.write(base + 264, bytes: (UInt64.max - 1).littleEndianBytes, rkey: key)
        let wrapped = try await c.fetchAndAdd(base + 264, delta: 3, rkey: key)
        let words = try await c.readWords(base + 256, count: 2, rkey: key)
        try expect(wrapped == UInt64.max - 1 && words == [50, 1], "FAA wrapping: answered \(wrapped), words \(words)")
        try expect(f.nic.peekWord(base + 256) == 50, "the CPU sees \(f.nic.peekWord(base + 256))")
        let counters = c.counters
        return "\(counters.batches) batches, \(counters.totalVerbs) verbs, \(counters.bytesRead) B read, \(counters.bytesWritten) B written"
    }

    private func byteOrder() async throws -> String {
        let f = try fixture()
        let c = try f.connect()
        let word = f.region.address + 512
        let value: UInt64 = 0x1122_3344_5566_7788
        try await c.write(word, bytes: value.littleEndianBytes, rkey: f.region.rkey)
        let answer = try await c.compareAndSwap(word, expected: value, desired: 0x0102_0304_0506_0708, rkey: f.region.rkey)
        try expect(answer == (true, value), "CAS on little-endian bytes answered \(answer)")
        let bytes = try await c.read(word, length: 8, rkey: f.region.rkey)
        try expect(bytes == UInt64(0x0102_0304_0506_0708).littleEndianBytes, "bytes after CAS \(bytes)")
        _ = try await c.fetchAndAdd(word, delta: 0x100, rkey: f.region.rkey)
        try expect(try await c.readWords(word, count: 1, rkey: f.region.rkey) == [0x0102_0304_0506_0808], "FAA carried into the wrong byte")
        return "operands and replies in host order; the remote word is little-endian"
    }

    private func batch() async throws -> String {
        let f = try fixture()
        let c = try f.connect()
        let key = f.region.rkey
        let base = f.region.address + 4096
        var verbs: [Verb] = []
        for i in 0..<16 {
            let word: RemoteAddress = base + UInt64(8 * i)
            verbs.append(.writeWord(word, UInt64(1000 + i), rkey: key))
        }
        for i in 0..<16 {
            let word: RemoteAddress = base + UInt64(8 * i)
            verbs.append(.read(word, length: 8, rkey: key))
        }
        for i in 0..<16 {
            let word: RemoteAddress = base + UInt64(8 * i)
            verbs.append(.compareAndSwap(word, expected: UInt64(1000 + i), desired: UInt64(2000 + i), rkey: key))
        }
        for i in 0..<16 {
            let word: RemoteAddress = base + UInt64(8 * i)
            verbs.append(.fetchAndAdd(word, delta: 1, rkey: key))
        }
        let before = c.counters.batches
        let results = try await c.post(verbs)
        try expect(c.counters.batches == before + 1, "one post counted as \(c.counters.batches - before) batches")
        try expect(results.count == 64, "\(results.count) results")
        for i in 0..<16 {
            try expect(results[i] == .written, "result \(i): \(results[i])")
            try expect(results[16 + i].words == [UInt64(1000 + i)], "READ \(i): \(results[16 + i])")
            try expect(results[32 + i].compareAndSwap == (true, UInt64(1000 + i)), "CAS \(i): \(results[32 + i])")
            try expect(results[48 + i] == .fetchAndAdd(original: UInt64(2000 + i)), "FAA \(i): \(results[48 + i])")
        }
        return "64 verbs, answers in posting order"
    }

    private func longBatch() async throws -> String {
        let f = try fixture()
        let c = try f.connect()
        let key = f.region.rkey
        let base = f.region.address
        let depth = c.queuePair.sendQueueDepth
        let count = depth * 2 + 44
        let verbs: [Verb] = (0..<count).map { .fetchAndAdd(base + 8 * UInt64($0 % 64), delta: 1, rkey: key) }
        let results = try await c.post(verbs)
        var originals: [UInt64: UInt64] = [:]
        for (i, result) in results.enumerated() {
            guard case .fetchAndAdd(let original) = result else { throw CheckFailure("result \(i): \(result)") }
            let slot = UInt64(i % 64)
            try expect(original == originals[slot, default: 0], "FAA \(i) answered \(original), expected \(originals[slot, default: 0])")
            originals[slot] = original + 1
        }
        let pattern = (0..<(1 << 20)).map { UInt8(truncatingIfNeeded: $0 &* 7) }
        try await c.write(base, bytes: pattern, rkey: key)
        let back = try await c.read(base, length: 1 << 20, rkey: key)
        try expect(back == pattern, "a 1 MiB READ does not return the 1 MiB WRITE")
        return "\(count) FAAs over a send queue of \(depth); 1 MiB WRITE and READ through a grown slab"
    }

    private func fenceOrdering() async throws -> String {
        let f = try fixture()
        let c = try f.connect()
        let key = f.region.rkey
        for round in 0..<50 {
            let word = f.region.address + 8192 + UInt64(8 * round)
            let results = try await c.post([
                .compareAndSwap(word, expected: 0, desired: 1, rkey: key),
                .read(word, length: 8, rkey: key),
                .writeWord(word, 7, rkey: key).fenced(),
                .read(word, length: 8, rkey: key),
            ])
            try expect(results[0].compareAndSwap == (true, 0), "round \(round): the CAS found \(results[0]) (the WRITE passed it)")
            try expect(results[1].words == [1], "round \(round): the READ before the WRITE saw \(results[1].words)")
            try expect(results[3].words == [7], "round \(round): the READ after the WRITE saw \(results[3].words)")
        }
        return "50 rounds: the fenced WRITE never passed the CAS or READ before it"
    }

    private func unknownKey() async throws -> String {
        let f = try fixture()
        let c = try f.connect()
        let word = f.region.address + 1024
        let bogus = RKey(rawValue: f.region.rkey.rawValue ^ 0x5a5a00)
        let violation = try await expectAccessError(
            c, [.writeWord(word, 99, rkey: f.region.rkey), .read(word, length: 8, rkey: bogus), .writeWord(word, 100, rkey: f.region.rkey)],
            [.accessRefused], at: 1)
        try expect(f.nic.peekWord(word) == 99, "the WRITE before the error did not land, or the one after did: \(f.nic.peekWord(word))")
        let fresh = try f.connect()
        try expect(try await fresh.readWords(word, count: 1, rkey: f.region.rkey) == [99], "a new connection does not work")
        return "\(violation); verbs before it executed, after it not; a new QP pair works"
    }

    private func accessRights() async throws -> String {
        let f = try fixture()
        let readOnly = try f.nic.registerRegion(pd: f.pd, address: f.nic.baseAddress + (1 << 20), length: 4096, access: .read)
        let noAtomic = try f.nic.registerRegion(pd: f.pd, address: f.nic.baseAddress + (2 << 20), length: 4096, access: [.read, .write])
        _ = try await f.connect().read(readOnly.address, length: 8, rkey: readOnly.rkey)
        let write = try await expectAccessError(try f.connect(), [.writeWord(readOnly.address, 1, rkey: readOnly.rkey)], [.accessRefused], at: 0)
        let atomic = try await expectAccessError(
            try f.connect(), [.fetchAndAdd(noAtomic.address, delta: 1, rkey: noAtomic.rkey)], [.accessRefused, .invalidRequest], at: 0)
        let past = try await expectAccessError(try f.connect(), [.read(readOnly.address + 4088, length: 16, rkey: readOnly.rkey)], [.accessRefused], at: 0)
        return "write: \(write); atomic: \(atomic); past the end: \(past)"
    }

    private func malformedVerbs() async throws -> String {
        let f = try fixture()
        let misaligned = try await expectAccessError(
            try f.connect(), [.compareAndSwap(f.region.address + 4, expected: 0, desired: 1, rkey: f.region.rkey)],
            [.misalignedAtomic], at: 0)
        let empty = try await expectAccessError(
            try f.connect(), [.read(f.region.address, length: 8, rkey: f.region.rkey), .read(f.region.address, length: 0, rkey: f.region.rkey)],
            [.invalidLength], at: 1)
        return "misaligned CAS: \(misaligned); zero length: \(empty)"
    }

    private func breakConnections() async throws -> String {
        let f = try fixture()
        let otherPD = try f.nic.allocateProtectionDomain()
        let otherRegion = try f.nic.registerRegion(pd: otherPD, address: f.nic.baseAddress + (2 << 20), length: 4096, access: .all)
        let a = try f.connect()
        let b = try f.connect()
        let other = try f.nic.openConnection(from: NodeID(1002), protectionDomain: otherPD) as! VerbsConnection
        _ = try await a.readWords(f.region.address, count: 1, rkey: f.region.rkey)
        try f.nic.breakConnections(of: f.pd)
        try await expectBroken(a)
        try await expectBroken(b)
        _ = try await other.fetchAndAdd(otherRegion.address, delta: 1, rkey: otherRegion.rkey)
        let later = try f.connect()
        _ = try await later.fetchAndAdd(f.region.address, delta: 1, rkey: f.region.rkey)
        return "2 connections broken (both QPs ERR), the other domain and a later connection work"
    }

    private func type1Windows() async throws -> String {
        let f = try fixture()
        let window = try f.nic.allocateWindow(pd: f.pd)
        let target = f.region.address + 65536
        var key = try f.nic.bind(window, in: f.region, address: target, length: 4096, access: .all)
        let c = try f.connect()
        try await c.write(target, bytes: UInt64(5).littleEndianBytes, rkey: key)
        try expect(try await c.compareAndSwap(target, expected: 5, desired: 6, rkey: key) == (true, 5), "CAS through the window")
        try expect(try await c.readWords(target, count: 1, rkey: key) == [6], "READ through the window")
        var keys = [key]
        for _ in 0..<20 {
            let next = try f.nic.bind(window, in: f.region, address: target, length: 4096, access: .all)
            try expect(next == key.incremented, "rebind gave \(next), expected \(key.incremented) (ibv_inc_rkey)")
            key = next
            keys.append(key)
        }
        try expect(try await c.readWords(target, count: 1, rkey: key) == [6], "the newest key does not work")
        do {
            try f.nic.deregister(f.region)
            throw CheckFailure("a region with a bound window was deregistered")
        } catch let error as NICControlError {
            try expect(error == .regionHasBoundWindows(f.region.rkey), "deregister: \(error)")
        }
        _ = try await expectAccessError(c, [.read(target, length: 8, rkey: keys[3])], [.accessRefused], at: 0)
        _ = try await expectAccessError(try f.connect(), [.read(target, length: 8, rkey: keys[19])], [.accessRefused], at: 0)
        try f.nic.invalidate(window)
        _ = try await expectAccessError(try f.connect(), [.read(target, length: 8, rkey: key)], [.accessRefused], at: 0)
        try f.nic.deregister(f.region)
        return "21 binds, each key the previous with the next tag; old keys and the unbound key refused; deregister refused while bound, then done"
    }

    private func windowBounds() async throws -> String {
        let f = try fixture()
        let window = try f.nic.allocateWindow(pd: f.pd)
        let target = f.region.address + 65536
        let readOnly = try f.nic.bind(window, in: f.region, address: target, length: 4096, access: .read)
        _ = try await f.connect().read(target, length: 8, rkey: readOnly)
        let rights = try await expectAccessError(try f.connect(), [.writeWord(target, 1, rkey: readOnly)], [.accessRefused], at: 0)
        let c = try f.connect()
        do throws(FabricError) {
            _ = try await c.read(target + 8192, length: 8, rkey: readOnly)
        } catch {
            guard case .remoteAccess(.accessRefused, _, _, 0) = error else { throw CheckFailure("out-of-window READ: \(error)") }
            return "write through a read-only window: \(rights); out-of-window READ refused"
        }
        throw CheckSkipped("write through a read-only window refused (\(rights)), but \(device) does not enforce window bounds: a READ outside the window and inside its region succeeds (rxe checks the region, not the window)")
    }

    private func type2Windows() async throws -> String {
        let f = try fixture()
        let limits = f.nic.context.limits
        guard limits.windowType2A || limits.windowType2B else { throw CheckSkipped("\(device) offers no type-2 windows") }
        let c = try f.connect()
        guard let responderQP = c.peer else { throw CheckFailure("no responder QP in this process") }
        let responder = try VerbsConnection(remoteNode: NodeID(1001), queuePair: responderQP, peer: nil)
        let domain = responderQP.protectionDomain
        let window = try VerbsMemoryWindow(pd: domain, kind: .type2)
        let regionBytes = UnsafeMutableRawPointer(bitPattern: UInt(f.region.address.rawValue + 131072))!
        let region = try VerbsMemoryRegion(pd: domain, address: regionBytes, length: 8192, accessFlags: verbsAccessFlags(.all, localWrite: true, bindable: true))
        let address = UInt64(UInt(bitPattern: regionBytes))
        let flags = verbsAccessFlags(.all, localWrite: false, bindable: false)
        let first = try responder.bindType2(window, region: region, address: address, length: 4096, accessFlags: flags)
        try await c.write(RemoteAddress(address), bytes: UInt64(11).littleEndianBytes, rkey: RKey(rawValue: first))
        try expect(try await c.fetchAndAdd(RemoteAddress(address), delta: 1, rkey: RKey(rawValue: first)) == 11, "FAA through the type-2 window")
        try responder.invalidateType2(window)
        let second = try responder.bindType2(window, region: region, address: address, length: 4096, accessFlags: flags)
        try expect(second == ibv_inc_rkey(first), "rebind after LOCAL_INV gave 0x\(String(second, radix: 16))")
        try expect(try await c.readWords(RemoteAddress(address), count: 1, rkey: RKey(rawValue: second)) == [12], "READ with the new type-2 key")
        _ = try await expectAccessError(c, [.read(RemoteAddress(address), length: 8, rkey: RKey(rawValue: first))], [.accessRefused], at: 0)
        return "bound on the responder QP; invalidated key refused; rebind with ibv_inc_rkey works"
    }

    private func bootstrap(fence: Bool) async throws -> String {
        let nic = try makeNIC()
        let pd = try nic.allocateProtectionDomain()
        let region = try nic.registerRegion(pd: pd, address: nic.baseAddress, length: 65536, access: .all)
        let listener = try VerbsBootstrapListener(host: "127.0.0.1", port: 0)
        var grant: [UInt8] = region.address.rawValue.littleEndianBytes + region.length.littleEndianBytes
        grant += UInt64(region.rkey.rawValue).littleEndianBytes
        let payload = grant
        // The memory node's side on a thread of its own: both sides block on their sockets.
        let serverFailure = Locked<String?>(nil)
        let server = HardwareSuiteThread {
            do {
                let channel = try listener.accept(timeoutSeconds: 20)
                try nic.serveBootstrap(channel, protectionDomain: pd, payload: payload, timeoutSeconds: 20)
            } catch { serverFailure.withLock { $0 = "\(error)" } }
        }
        let computeContext = try VerbsContext(device: device)
        let channel = try verbsBootstrapConnect(host: "127.0.0.1", port: listener.port)
        let (connection, received) = try VerbsConnection.bootstrap(
            context: computeContext, channel: channel, remoteNode: NodeID(0), timeoutSeconds: 20, completionTimeoutSeconds: 15)
        server.join()
        if let failure = serverFailure.withLock({ $0 }) { throw CheckFailure("memory node side: \(failure)") }
        try expect(received == payload, "the grant arrived as \(received)")
        let words = [UInt64](littleEndianWords: received)
        let address = RemoteAddress(words[0])
        let key = RKey(rawValue: UInt32(words[2]))
        try await connection.write(address + 8, bytes: UInt64(77).littleEndianBytes, rkey: key)
        try expect(try await connection.compareAndSwap(address + 8, expected: 77, desired: 78, rkey: key) == (true, 77), "CAS over the bootstrapped QP")
        var refused = ""
        do {
            _ = try verbsBootstrapConnect(host: "127.0.0.1", port: 1, timeoutSeconds: 2)
        } catch { refused = "\(error)" }
        try expect(refused.contains("connect to 127.0.0.1:1"), "a refused connection says: \(refused)")
        let summary = "grant of \(received.count) B received, CAS works; refused connect: \"\(refused)\""
        guard fence else { return summary }
        try nic.breakConnections(of: pd)
        let start = SystemRuntime.shared.nowNanoseconds
        let outcome: FabricError?
        do throws(FabricError) {
            try await connection.write(address + 16, bytes: UInt64(0xdead).littleEndianBytes, rkey: key)
            outcome = nil
        } catch {
            outcome = error
        }
        guard let error = outcome else { throw CheckFailure("the remote compute node still writes into a fenced domain") }
        let waited = Double((SystemRuntime.shared.nowNanoseconds - start) / 1_000_000) / 1000
        try expect(nic.peekWord(address + 16) == 0, "the fenced compute node's WRITE landed")
        try await expectBroken(connection)
        if case .localNIC(let status, _) = error, status.hasPrefix("no completion") {
            return "its WRITE never landed; \(device) reported no completion at all (no retry-exceeded error) within \(waited) s, so the connection broke on its completion timeout"
        }
        try expect(error == .peerDead(NodeID(0)) || error == .connectionBroken(NodeID(0)), "after breakConnections the remote requester got \(error)")
        return "its WRITE never landed; it failed with \(error) after \(waited) s"
    }

    private func verbsCluster(poolBytes: UInt64, computeNodes: Int) async throws -> EmbeddedCluster {
        try await EmbeddedCluster.start(.init(memoryNodes: 1, poolBytesPerNode: poolBytes, computeNodes: computeNodes, fabric: .verbs(device: device)))
    }

    private func fillAndDrain() async throws -> String {
        let cluster = try await verbsCluster(poolBytes: 16 << 20, computeNodes: 1)
        let inspector = PoolInspector(cluster: cluster)
        let blocks = cluster.computeNodes[0]
        let application = ApplicationID(1)
        var held: [Block] = []
        var problems: [String] = []
        while true {
            do throws(AllocationError) {
                let block = try await blocks.allocate(chunkCountLog2: 4, application: application)
                held.append(block)
                problems += inspector.admit(block, owner: blocks.owner)
            } catch {
                guard case .outOfMemory = error else { throw error }
                break
            }
            if held.count > 4096 { throw CheckFailure("more blocks than the pool holds") }
        }
        await cluster.quiesce()
        problems += inspector.checkStructure()
        let expected = Int(cluster.memoryNodes[0].geometry.dataBytes / (16 * PoolGeometry.chunkBytes))
        try expect(held.count == expected, "filled \(held.count) blocks of 64 KiB, the pool holds \(expected)")
        for block in held {
            problems += inspector.release(block)
            try await blocks.free(block, application: application)
        }
        await cluster.quiesce()
        problems += inspector.checkAtRest() + inspector.everyHeaderEmpty()
        try expect(problems.isEmpty, "invariants: \(problems.prefix(5))")
        let stats = cluster.statistics
        return "\(held.count) blocks of 64 KiB filled the 16 MiB pool and were freed; \(Self.fixed(stats.roundTripsPerAllocation)) round trips per allocation"
    }

    /// Compute node X holds blocks of every layer and leaves a free half done (its commit
    /// landed, its flush never sent: the pending log of a dead node); the memory node fences
    /// X (its QPs to ERR, its regions deregistered, its slot dead) and recovers it through
    /// its own queue pair, while Y holds blocks; everything X held is free again, Y's are
    /// untouched, X restarts as a new incarnation and the pool drains to empty.
    private func recovery() async throws -> String {
        var configuration = EmbeddedCluster.Configuration(memoryNodes: 1, poolBytesPerNode: 32 << 20, computeNodes: 2, fabric: .verbs(device: device))
        configuration.failureDetection = false
        let cluster = try await EmbeddedCluster.start(configuration)
        let inspector = PoolInspector(cluster: cluster)
        let (x, y) = (cluster.computeNodes[0], cluster.computeNodes[1])
        let application = ApplicationID(1)
        var yBlocks: [Block] = []
        for size in [0, 3, 6] {
            let block = try await y.allocate(chunkCountLog2: size, application: application)
            yBlocks.append(block)
            try expect(inspector.admit(block, owner: y.owner).isEmpty, "Y's \(block) is not marked")
        }
        var xBlocks: [Block] = []
        for size in [0, 1, 4, 5, 7, 10] { xBlocks.append(try await x.allocate(chunkCountLog2: size, application: application)) }
        await cluster.quiesce()
        // X commits a free by hand, as its dying act: the header CAS only, no flush.
        let link = x.links[0]
        let victim = xBlocks[0]
        let slot = HeaderSlot(committing: victim)
        var trace = OperationTrace()
        let outcome: UpdateOutcome<SpanHeader> = try await link.update(.header(slot, known: inspector.span(on: victim.memoryNode, section: victim.section, span: victim.spanInSection)?.rawValue), UpdatePolicy(attemptsMax: 4), trace: &trace) {
            $0.releasing(SpanHeader.run(of: victim), owner: x.owner)
        }
        try expect(outcome.committedWord?.logPending == true, "X's free did not commit: \(outcome)")
        try await cluster.fence(computeNode: 0)
        let reports = try await cluster.recover(computeNode: 0)
        let report = reports[0]
        try expect(report.blocksReclaimed == xBlocks.count - 1, "recovery reclaimed \(report.blocksReclaimed) blocks, X held \(xBlocks.count - 1) (and had freed one)")
        try expect(report.recordsFreed == xBlocks.count, "recovery freed \(report.recordsFreed) records, not \(xBlocks.count)")
        let again = try await cluster.recover(computeNode: 0)
        try expect(again[0].alreadyRecovered, "a second recovery found work: \(again)")
        var problems = inspector.checkAtRest()
        let reborn = try await cluster.restart(computeNode: 0)
        let block = try await reborn.allocate(chunkCountLog2: 10, application: application)
        try await reborn.free(block, application: application)
        for block in yBlocks {
            problems += inspector.release(block)
            try await y.free(block, application: application)
        }
        await cluster.quiesce()
        problems += inspector.checkAtRest() + inspector.everyHeaderEmpty()
        try expect(problems.isEmpty, "invariants: \(problems.prefix(5))")
        let incarnation = inspector.nodeSlot(on: NodeID(0), owner: x.owner)?.incarnation ?? 0
        return "\(report.blocksReclaimed) blocks reclaimed (every layer) and 1 pending free settled in \(report.passes) passes, \(report.verbs) verbs; Y untouched; X back as incarnation \(incarnation); pool empty"
    }

    private func mixedWorkload() async throws -> String {
        let cluster = try await verbsCluster(poolBytes: 32 << 20, computeNodes: 2)
        let inspector = Locked(PoolInspector(cluster: cluster))
        let problems = Locked<[String]>([])
        let counts = Locked((allocations: 0, frees: 0, outOfMemory: 0))
        await withTaskGroup(of: Void.self) { group in
            for task in 0..<4 {
                let blocks = cluster.computeNodes[task / 2]
                let application = ApplicationID(UInt16(task % 2 + 1))
                group.addTask {
                    var random = SeededRandom(seed: 0xF1E2 &+ UInt64(task))
                    var held: [Block] = []
                    for _ in 0..<60 {
                        if !held.isEmpty, random.next() % 100 < 45 {
                            let block = held.remove(at: Int(random.next() % UInt64(held.count)))
                            let found = inspector.withLock { $0.release(block) }
                            do throws(AllocationError) {
                                try await blocks.free(block, application: application)
                                counts.withLock { $0.frees += 1 }
                            } catch { problems.withLock { $0.append("free \(block): \(error)") } }
                            problems.withLock { $0 += found }
                        } else {
                            let size = Int(random.next() % 7)
                            do throws(AllocationError) {
                                let block = try await blocks.allocate(chunkCountLog2: size, application: application)
                                held.append(block)
                                counts.withLock { $0.allocations += 1 }
                                let found = inspector.withLock { $0.admit(block, owner: blocks.owner) }
                                problems.withLock { $0 += found }
                            } catch {
                                if case .outOfMemory = error { counts.withLock { $0.outOfMemory += 1 } } else {
                                    problems.withLock { $0.append("allocate 2^\(size): \(error)") }
                                }
                            }
                        }
                    }
                    for block in held {
                        let found = inspector.withLock { $0.release(block) }
                        problems.withLock { $0 += found }
                        do throws(AllocationError) { try await blocks.free(block, application: application) } catch {
                            problems.withLock { $0.append("final free \(block): \(error)") }
                        }
                    }
                }
            }
        }
        await cluster.quiesce()
        let atRest = inspector.withLock { $0.checkStructure() + $0.checkAtRest() + $0.everyHeaderEmpty() }
        let all = problems.withLock { $0 } + atRest
        try expect(all.isEmpty, "\(all.count) violations: \(all.prefix(5))")
        let (allocations, frees, outOfMemory) = counts.withLock { $0 }
        return "\(allocations) allocations, \(frees) frees, \(outOfMemory) out of memory; no overlap, pool at rest and empty"
    }

    /// One task's seeded sequence on a cluster, each operation awaited and the cluster
    /// quiesced after it: the blocks it gets depend only on the seed.
    private static func seededSequence(_ cluster: EmbeddedCluster, seed: UInt64) async throws -> [String] {
        let blocks = cluster.computeNodes[0]
        var random = SeededRandom(seed: seed)
        var held: [Block] = []
        var trace: [String] = []
        for _ in 0..<80 {
            if !held.isEmpty, random.next() % 100 < 40 {
                let block = held.remove(at: Int(random.next() % UInt64(held.count)))
                try await blocks.free(block, application: ApplicationID(1))
                trace.append("free \(block.firstChunk)")
            } else {
                let size = Int(random.next() % 10)
                do throws(AllocationError) {
                    let block = try await blocks.allocate(chunkCountLog2: size, application: ApplicationID(1))
                    held.append(block)
                    trace.append("allocate 2^\(size) at chunk \(block.firstChunk)")
                } catch {
                    guard case .outOfMemory = error else { throw error }
                    trace.append("allocate 2^\(size): out of memory")
                }
            }
            await cluster.quiesce()
        }
        return trace
    }

    private func comparison() async throws -> String {
        let simulated = try await EmbeddedCluster.start(.init(memoryNodes: 1, poolBytesPerNode: 16 << 20, computeNodes: 1))
        let onDevice = try await verbsCluster(poolBytes: 16 << 20, computeNodes: 1)
        let expected = try await Self.seededSequence(simulated, seed: 2026)
        let actual = try await Self.seededSequence(onDevice, seed: 2026)
        if let first = zip(expected, actual).enumerated().first(where: { $0.element.0 != $0.element.1 }) {
            throw CheckFailure("operation \(first.offset): simulated \(first.element.0), on \(device) \(first.element.1)")
        }
        try expect(expected.count == actual.count, "lengths differ")
        return "\(actual.count) operations, identical blocks (\(actual.filter { $0.hasPrefix("allocate") && !$0.hasSuffix("memory") }.count) allocations)"
    }

    private static func fixed(_ value: Double) -> String {
        let scaled = (value * 1000).rounded() / 1000
        return "\(scaled)"
    }
}

/// A POSIX thread running one closure, joined by `join()`.
private final class HardwareSuiteThread: @unchecked Sendable {
    private var thread = pthread_t()
    private let body: @Sendable () -> Void

    init(_ body: @escaping @Sendable () -> Void) {
        self.body = body
        let context = Unmanaged.passRetained(self).toOpaque()
        let status = pthread_create(&thread, nil, { raw in
            let me = Unmanaged<HardwareSuiteThread>.fromOpaque(raw!).takeRetainedValue()
            me.body()
            return nil
        }, context)
        precondition(status == 0, "pthread_create failed: \(status)")
    }

    func join() { pthread_join(thread, nil) }
}
