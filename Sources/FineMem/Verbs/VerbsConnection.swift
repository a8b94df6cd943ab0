import Atomics
import CVerbs
#if canImport(Glibc)
import Glibc
#endif

/// A reliable connection on a real RC queue pair: the fabric seam over libibverbs.
///
/// A batch is posted as one chain of work requests (one doorbell, `ibv_post_send` once per
/// batch, or once per `sendQueueDepth` verbs for a longer one), the last one signalled,
/// `IBV_SEND_FENCE` on the verbs that ask for it. The posting task then polls the
/// completion queue: a short busy poll, then suspending between polls so that other tasks
/// of its thread run while the NIC works (and sleeping 20 us each time, so that a software
/// provider's kernel work gets the CPU). Batches of one connection are
/// serialised: their work requests never interleave.
///
/// WRITE sources, READ destinations and atomic replies live in one registered slab per
/// connection, reused by every batch (it grows, with one new registration, only for a
/// batch larger than any before).
///
/// The first failed work completion breaks the connection for good, as the QP is then in
/// the error state: the failing verb's status is mapped to a `FabricError`
/// (`verbsFabricError`), later verbs of the batch do not execute, and every later batch
/// fails with `connectionBroken`. A new connection is a new QP pair. When the peer QP lives
/// in this process (the embedded cluster, the memory node's loopback), it is moved to the
/// error state with this one, so both ends agree on every device.
package final class VerbsConnection: FabricConnection, @unchecked Sendable {
    package let remoteNode: NodeID
    package let queuePair: VerbsQueuePair
    /// The responder QP when it lives in this process; moved to the error state with ours.
    package let peer: VerbsQueuePair?
    /// The protection domain of the slab (the requester's).
    private let localDomain: VerbsProtectionDomain
    /// Held by the batch (or window bind) using the QP: batches are serialised so that
    /// their work requests never interleave. Waiting for it suspends (`post`) or yields the
    /// thread (set-up calls), never blocks a thread of the cooperative pool.
    private let owner = ManagedAtomic<Bool>(false)
    private var slab: VerbsSlab
    private let chain: VerbsWorkRequestChain
    private let completions: UnsafeMutableBufferPointer<ibv_wc>
    private let broken = ManagedAtomic<Bool>(false)
    private let countersValue = Locked(FabricCounters())

    /// Longest wait for a completion before the connection is declared broken (the QP's
    /// own retry timer normally answers long before: 8 tries of about 67 ms).
    private let completionTimeoutNanoseconds: UInt64

    package init(
        remoteNode: NodeID, queuePair: VerbsQueuePair, peer: VerbsQueuePair?, slabBytes: Int = 64 << 10,
        completionTimeoutSeconds: Double = 60
    ) throws(VerbsError) {
        self.remoteNode = remoteNode
        completionTimeoutNanoseconds = UInt64(completionTimeoutSeconds * 1e9)
        self.queuePair = queuePair
        self.peer = peer
        localDomain = queuePair.protectionDomain
        slab = try VerbsSlab(pd: queuePair.protectionDomain, length: slabBytes)
        chain = VerbsWorkRequestChain(capacity: queuePair.sendQueueDepth)
        completions = .allocate(capacity: 16)
    }

    deinit { completions.deallocate() }

    /// Creates two QPs on `path`'s device, the requester in `requesterPD` and the responder
    /// in `responderPD`, and connects them to each other (RESET -> INIT -> RTR -> RTS on
    /// both, over the device's own GID: a loopback through the NIC).
    package static func loopbackPair(
        requesterPD: VerbsProtectionDomain, responderPD: VerbsProtectionDomain, path: VerbsPath, remoteNode: NodeID,
        sendQueueDepth: Int = 128
    ) throws(VerbsError) -> VerbsConnection {
        let context = requesterPD.context
        let requesterCQ = try VerbsCompletionQueue(context: context, entries: sendQueueDepth * 2)
        let requester = try VerbsQueuePair(pd: requesterPD, cq: requesterCQ, sendQueueDepth: sendQueueDepth)
        let responderCQ = try VerbsCompletionQueue(context: responderPD.context, entries: sendQueueDepth * 2)
        let responder = try VerbsQueuePair(pd: responderPD, cq: responderCQ, sendQueueDepth: sendQueueDepth)
        let requesterPSN = UInt32.random(in: 0..<(1 << 24))
        let responderPSN = UInt32.random(in: 0..<(1 << 24))
        try requester.connect(to: responder.endpoint(path: path, packetSequenceNumber: responderPSN), path: path, localPSN: requesterPSN)
        try responder.connect(to: requester.endpoint(path: path, packetSequenceNumber: requesterPSN), path: path, localPSN: responderPSN)
        return try VerbsConnection(remoteNode: remoteNode, queuePair: requester, peer: responder)
    }

    /// Verb, batch and byte counts so far.
    package var counters: FabricCounters { countersValue.withLock { $0 } }

    /// Whether the connection is in the error state.
    package var isBroken: Bool { broken.load(ordering: .acquiring) }

    /// Moves the connection to the error state (both QPs when the peer is in this
    /// process): from now on every verb fails with `connectionBroken`; work requests still
    /// outstanding complete flushed, and the responder drops whatever still arrives.
    package func breakConnection() {
        broken.store(true, ordering: .releasing)
        try? queuePair.toError()
        try? peer?.toError()
    }

    package func post(_ verbs: [Verb]) async throws(FabricError) -> [VerbResult] {
        while !owner.compareExchange(expected: false, desired: true, ordering: .acquiring).exchanged { await Task.yield() }
        defer { owner.store(false, ordering: .releasing) }
        var run = try start(verbs)
        var idle = 0
        while true {
            if let results = try step(&run) {
                // A software provider looping back may complete the whole batch inside
                // ibv_post_send: suspend once anyway, so that a task posting batch after
                // batch never holds its thread (and starves the other tasks) for good.
                if idle <= 200 { await Task.yield() }
                return results
            }
            idle += 1
            // A short busy poll (yielding the CPU to the kernel, where a software provider
            // does its work); then let the other tasks of this thread run between polls,
            // and sleep briefly each time so the provider is never starved.
            if idle <= 200 {
                sched_yield()
            } else {
                await Task.yield()
                usleep(20)
            }
        }
    }

    /// `post` on the caller's thread, polling without suspending (set-up code).
    package func postSynchronously(_ verbs: [Verb]) throws(FabricError) -> [VerbResult] {
        acquireSynchronously()
        defer { owner.store(false, ordering: .releasing) }
        var run = try start(verbs)
        var idle = 0
        while true {
            if let results = try step(&run) { return results }
            idle += 1
            if idle > 2_000 { usleep(20) } else if idle > 200 { sched_yield() }
        }
    }

    private func acquireSynchronously() {
        while !owner.compareExchange(expected: false, desired: true, ordering: .acquiring).exchanged { sched_yield() }
    }

    /// A batch being executed: posted chunk by chunk (at most a send queue, at most a slab
    /// each), each chunk polled until its last verb completes.
    private struct BatchRun {
        let verbs: [Verb]
        /// Verbs before this index are well-formed; the one at it (if any) is refused.
        let valid: Int
        var results: [VerbResult] = []
        /// The chunk posted and not yet completed.
        var inFlight: Range<Int>?
        var layout = VerbsSlabLayout([][...])
        var next = 0
        var waitingSince: UInt64 = 0
    }

    private func start(_ verbs: [Verb]) throws(FabricError) -> BatchRun {
        guard !isBroken else { throw .connectionBroken(remoteNode) }
        countersValue.withLock { $0.batches += 1 }
        // A verb of no length, or an atomic on an address that is not 8-byte aligned, is
        // refused as the simulated NIC refuses it: the verbs before it execute, then the
        // connection breaks. (Providers differ: rxe refuses a misaligned atomic in
        // ibv_post_send with EINVAL, others complete it with IBV_WC_REM_INV_REQ_ERR.)
        var run = BatchRun(verbs: verbs, valid: verbs.firstIndex(where: Self.isMalformed) ?? verbs.count)
        run.results.reserveCapacity(verbs.count)
        return run
    }

    /// Advances `run`: posts the next chunk, or polls the one in flight. Answers the
    /// results when the batch is done, nil while it waits for the NIC.
    private func step(_ run: inout BatchRun) throws(FabricError) -> [VerbResult]? {
        while true {
            if let chunk = run.inFlight {
                guard try pollCompletion(of: run.verbs[chunk]) else {
                    if run.waitingSince == 0 { run.waitingSince = SystemRuntime.shared.nowNanoseconds }
                    if SystemRuntime.shared.nowNanoseconds - run.waitingSince > completionTimeoutNanoseconds {
                        breakConnection()
                        throw .localNIC(status: "no completion within \(completionTimeoutNanoseconds / 1_000_000_000) s", verbIndex: chunk.lowerBound)
                    }
                    return nil
                }
                collect(run.verbs[chunk], layout: run.layout, into: &run.results)
                run.inFlight = nil
                run.next = chunk.upperBound
                continue
            }
            if run.next < run.valid {
                var end = run.next
                var bytes = 0
                while end < run.valid, end - run.next < chain.capacity {
                    let need = (run.verbs[end].payloadBytes + 7) / 8 * 8
                    if end > run.next, bytes + need > slab.length { break }
                    bytes += need
                    end += 1
                }
                if bytes > slab.length { try growSlab(to: bytes) }
                let chunk = run.next..<end
                run.layout = VerbsSlabLayout(run.verbs[chunk])
                try postChunk(run.verbs[chunk], layout: run.layout)
                run.inFlight = chunk
                run.waitingSince = 0
                continue
            }
            if run.valid < run.verbs.count {
                breakConnection()
                let verb = run.verbs[run.valid]
                throw .remoteAccess(verb.payloadBytes <= 0 ? .invalidLength : .misalignedAtomic, address: verb.address, rkey: verb.rkey, verbIndex: run.valid)
            }
            return run.results
        }
    }

    private static func isMalformed(_ verb: Verb) -> Bool {
        verb.payloadBytes <= 0 || (verb.kind.isAtomic && verb.address.rawValue % 8 != 0)
    }

    private func growSlab(to bytes: Int) throws(FabricError) {
        var size = slab.length
        while size < bytes { size *= 2 }
        do {
            slab = try VerbsSlab(pd: localDomain, length: size)
        } catch {
            throw .localNIC(status: "\(error)", verbIndex: 0)
        }
    }

    /// Copies the WRITE payloads into the slab and posts the chunk's chain (one doorbell).
    private func postChunk(_ verbs: ArraySlice<Verb>, layout: VerbsSlabLayout) throws(FabricError) {
        for (position, verb) in verbs.enumerated() {
            if case .write(_, let bytes, _, _) = verb {
                bytes.withUnsafeBytes { (slab.bytes + layout.offsets[position]).copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
            }
        }
        chain.fill(verbs, layout: layout, slabAddress: UInt64(UInt(bitPattern: slab.bytes)), lkey: slab.region.lkey)
        do {
            try queuePair.post(chain.head)
        } catch {
            let wasBroken = isBroken
            breakConnection()
            throw wasBroken ? .connectionBroken(remoteNode) : .localNIC(status: "\(error)", verbIndex: verbs.startIndex)
        }
    }

    /// Reads the chunk's answers out of the slab.
    private func collect(_ verbs: ArraySlice<Verb>, layout: VerbsSlabLayout, into results: inout [VerbResult]) {
        var counters = FabricCounters()
        for (position, verb) in verbs.enumerated() {
            let local = slab.bytes + layout.offsets[position]
            switch verb {
            case .read(_, let length, _, _):
                results.append(.read(Array(UnsafeRawBufferPointer(start: local, count: length))))
                counters.bytesRead += UInt64(length)
            case .write(_, let bytes, _, _):
                results.append(.written)
                counters.bytesWritten += UInt64(bytes.count)
            case .compareAndSwap(_, let expected, _, _, _):
                let original = local.loadUnaligned(as: UInt64.self)
                results.append(.compareAndSwap(exchanged: original == expected, original: original))
            case .fetchAndAdd:
                results.append(.fetchAndAdd(original: local.loadUnaligned(as: UInt64.self)))
            }
            counters.verbs[verb.kind.rawValue] += 1
        }
        countersValue.withLock { total in
            for kind in total.verbs.indices { total.verbs[kind] += counters.verbs[kind] }
            total.bytesRead += counters.bytesRead
            total.bytesWritten += counters.bytesWritten
        }
    }

    /// Polls the completion queue once: true when the chunk's last verb has completed;
    /// throws the mapped error of the first failed completion.
    private func pollCompletion(of verbs: ArraySlice<Verb>) throws(FabricError) -> Bool {
        let last = UInt64(verbs.endIndex - 1)
        while true {
            let n: Int
            do { n = try queuePair.completionQueue.poll(into: completions) } catch {
                breakConnection()
                throw .localNIC(status: "\(error)", verbIndex: verbs.startIndex)
            }
            if n == 0 { return false }
            for i in 0..<n {
                let wc = completions[i]
                if wc.status != IBV_WC_SUCCESS {
                    let index = Int(wc.wr_id)
                    let wasBroken = isBroken
                    breakConnection()
                    if wasBroken { throw .connectionBroken(remoteNode) }
                    let verb = verbs.indices.contains(index) ? verbs[index] : verbs[verbs.startIndex]
                    throw verbsFabricError(status: wc.status, verb: verb, index: index, remote: remoteNode)
                }
                if wc.wr_id == last { return true }
            }
        }
    }

    // MARK: Window binds (posted on this QP by the memory node)

    /// Binds a type-1 window over `[address, address+length)` of `region` with `access`
    /// (`ibv_bind_mw` on this QP, signalled, waited for); a length of zero unbinds (with
    /// the region given, as rxe needs). Answers the window's new rkey.
    package func bindType1(
        _ window: VerbsMemoryWindow, region: VerbsMemoryRegion, address: UInt64, length: UInt64, accessFlags: UInt32
    ) throws(VerbsError) -> UInt32 {
        acquireSynchronously()
        defer { owner.store(false, ordering: .releasing) }
        guard !isBroken else { throw VerbsError(call: "ibv_bind_mw on a broken connection", errno: ENOTCONN) }
        var bind = ibv_mw_bind()
        bind.wr_id = UInt64.max
        bind.send_flags = IBV_SEND_SIGNALED.rawValue
        bind.bind_info.mr = region.raw
        bind.bind_info.addr = length == 0 ? UInt64(UInt(bitPattern: region.address)) : address
        bind.bind_info.length = length
        bind.bind_info.mw_access_flags = accessFlags
        try verbsCheck(ibv_bind_mw(queuePair.raw, window.raw, &bind), "ibv_bind_mw")
        try waitForControl("ibv_bind_mw")
        return window.rkey
    }

    /// Binds a type-2 window with `IBV_WR_BIND_MW` posted on this QP, to key `rkey` (the
    /// window's current key with the next tag, `ibv_inc_rkey`). The window then works only
    /// for requests arriving at this QP (type-2B). The window's user-space key is updated by
    /// hand (rxe checks it on the next bind; libibverbs does not update it).
    package func bindType2(
        _ window: VerbsMemoryWindow, region: VerbsMemoryRegion, address: UInt64, length: UInt64, accessFlags: UInt32
    ) throws(VerbsError) -> UInt32 {
        acquireSynchronously()
        defer { owner.store(false, ordering: .releasing) }
        guard !isBroken else { throw VerbsError(call: "IBV_WR_BIND_MW on a broken connection", errno: ENOTCONN) }
        let newKey = ibv_inc_rkey(window.rkey)
        var wr = ibv_send_wr()
        wr.wr_id = UInt64.max
        wr.opcode = IBV_WR_BIND_MW
        wr.send_flags = IBV_SEND_SIGNALED.rawValue
        wr.bind_mw.mw = window.raw
        wr.bind_mw.rkey = newKey
        wr.bind_mw.bind_info.mr = region.raw
        wr.bind_mw.bind_info.addr = address
        wr.bind_mw.bind_info.length = length
        wr.bind_mw.bind_info.mw_access_flags = accessFlags
        try queuePair.post(&wr)
        try waitForControl("IBV_WR_BIND_MW")
        window.rkey = newKey
        return newKey
    }

    /// Invalidates the current key of a type-2 window (`IBV_WR_LOCAL_INV` on this QP).
    package func invalidateType2(_ window: VerbsMemoryWindow) throws(VerbsError) {
        acquireSynchronously()
        defer { owner.store(false, ordering: .releasing) }
        var wr = ibv_send_wr()
        wr.wr_id = UInt64.max
        wr.opcode = IBV_WR_LOCAL_INV
        wr.send_flags = IBV_SEND_SIGNALED.rawValue
        wr.invalidate_rkey = window.rkey
        try queuePair.post(&wr)
        try waitForControl("IBV_WR_LOCAL_INV")
    }

    private func waitForControl(_ call: String) throws(VerbsError) {
        var idle = 0
        var started: UInt64 = 0
        while true {
            let n = try queuePair.completionQueue.poll(into: completions)
            for i in 0..<n where completions[i].wr_id == UInt64.max {
                let status = completions[i].status
                guard status == IBV_WC_SUCCESS else {
                    breakConnection()
                    throw VerbsError(call: "\(call) completed with \(verbsStatusName(status))", errno: EIO)
                }
                return
            }
            if n > 0 { continue }
            idle += 1
            if idle == 2_000 { started = SystemRuntime.shared.nowNanoseconds }
            if idle > 2_000 {
                if SystemRuntime.shared.nowNanoseconds - started > completionTimeoutNanoseconds {
                    breakConnection()
                    throw VerbsError(call: "\(call): no completion within \(completionTimeoutNanoseconds / 1_000_000_000) s", errno: ETIMEDOUT)
                }
                usleep(20)
            } else if idle > 200 {
                sched_yield()
            }
        }
    }
}
