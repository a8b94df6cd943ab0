/// A reliable connection to a `SimulatedNIC`.
///
/// **Immediate mode** (no simulator): a batch executes on the caller's thread with real
/// atomics, safe under real concurrency. Batches of one connection execute in posting
/// order and so do the verbs of a batch, WRITEs included: immediate mode never lets a
/// WRITE pass an earlier READ or atomic, because real threads give no seeded choice that
/// a failing run could be replayed with. Ordering bugs are the virtual-time runs' job.
///
/// **Virtual time** (with a `Simulator`): the connection is a send queue of verbs across
/// batches. The NIC executes them one at a time, at the times the latency model gives,
/// interleaved with other connections' verbs, under the ordering rules of a
/// reliable-connected QP (see `Verb`):
/// - whenever the next verb in posting order is a READ or an atomic and the first WRITE
///   queued behind it is unfenced and has arrived, the simulator's seeded generator picks
///   which of the two executes next, each with probability 1/2 (unless
///   `Simulator.reordersUnfencedWrites` is off): an unfenced WRITE may pass earlier READs
///   and atomics of its batch or of an earlier batch still queued, so a missing fence
///   shows within a few seeds;
/// - nothing else is reordered: WRITEs keep their order, READs and atomics keep theirs,
///   and a READ or atomic never passes an earlier WRITE;
/// - a fenced verb starts no earlier than two one-way crossings after the last READ or
///   atomic of the connection finished: its answer goes back to the compute node, whose
///   NIC then sends the fenced verb (`IBV_SEND_FENCE`).
///
/// Results come back in posting order. A batch completes one crossing after its last verb
/// finishes (plus the READ payload), as without reordering; a batch whose verbs all
/// finished before those of an earlier batch (a WRITE passed that batch's atomic) is not
/// completed before it, as a QP's completions come in posting order.
///
/// **Scripted** (a `Simulator` with `ScheduleExploration.scripted`): the same send queue
/// and ordering rules, without times. A posted verb is ready at once; the simulator picks
/// which connection's verb executes next (the script decides among several, see
/// `ScriptedScheduler`), and a WRITE that may pass the verbs before it is one more option
/// instead of a coin flip. A batch is answered as soon as its last verb has executed (in
/// posting order, as above), with no crossing back. Crashes after a number of verbs and
/// late verbs work as below (the number of late verbs is still a seeded draw, not a
/// choice); stalls do not delay anything.
///
/// Faults apply in virtual time. When the local node has crashed, the next verb of the
/// connection to execute finds out: every batch still outstanding on the connection is
/// answered `localCrash` at once (its `executedVerbs` counts the verbs of that batch that
/// had executed), and of the verbs the node had posted that have not executed, a prefix
/// in execution order of a length the seeded generator picks (none to all, uniformly)
/// still executes later, at the NIC's pace, with nobody awaiting it; the rest is dropped.
/// Work requests already posted outlive their host, and an RC responder executes them in
/// order until the stream stops. After a remote access error, a dead memory node, or
/// `breakConnection()` (the memory node fencing the compute node), the connection stays
/// broken (QP error state): every later verb, late ones included, fails and has no effect.
package final class SimulatedConnection: FabricConnection, @unchecked Sendable {
    package let nic: SimulatedNIC
    package let localNode: NodeID
    package let protectionDomain: ProtectionDomain
    package var remoteNode: NodeID { nic.node }
    let simulator: Simulator?

    /// The error state and the counters. Held while a verb is checked and performed, so
    /// that `breakConnection()` waits for a verb in progress and no verb lands after it.
    private let state = Locked(State())
    /// Serialises immediate-mode batches of this connection (posting order).
    private let order = Lock()
    /// The virtual-time send queue; touched only on the simulator's thread.
    private let queue = SendQueue()

    private struct State {
        var broken = false
        var counters = FabricCounters()
    }

    init(nic: SimulatedNIC, localNode: NodeID, protectionDomain: ProtectionDomain, simulator: Simulator?) {
        self.nic = nic
        self.localNode = localNode
        self.protectionDomain = protectionDomain
        self.simulator = simulator
    }

    /// Verb, batch and byte counts so far.
    package var counters: FabricCounters { state.withLock { $0.counters } }

    /// Whether the connection is in the error state.
    package var isBroken: Bool { state.withLock { $0.broken } }

    /// Puts the connection in the error state (a fault, or fencing of its node). A verb
    /// executing on another thread finishes before this returns; every later one fails
    /// with `connectionBroken`, including verbs already posted.
    package func breakConnection() { state.withLock { $0.broken = true } }

    package func post(_ verbs: [Verb]) async throws(FabricError) -> [VerbResult] {
        if let simulator {
            let outcome = await withUnsafeContinuation { (continuation: UnsafeContinuation<Result<[VerbResult], FabricError>, Never>) in
                startVirtualBatch(verbs, simulator: simulator, continuation: continuation)
            }
            return try outcome.get()
        }
        return try order.withLock { () throws(FabricError) -> [VerbResult] in
            try executeImmediately(verbs)
        }
    }

    /// In immediate mode, executes the batch on the caller's thread without allocating;
    /// in virtual time, as the same verbs through `post(_:)`.
    package func post(_ batch: inout WordBatch) async throws(FabricError) {
        guard simulator == nil else { return try await postAsVerbs(&batch) }
        try order.withLock { () throws(FabricError) in
            try state.withLock { (s) throws(FabricError) in
                guard !s.broken else { throw .connectionBroken(nic.node) }
                s.counters.batches += 1
                for index in 0..<batch.count {
                    let entry = batch[index]
                    if nic.isPoweredOff {
                        s.broken = true
                        throw .peerDead(nic.node)
                    }
                    if let violation = nic.authorize(entry, pd: protectionDomain) {
                        s.broken = true
                        throw .remoteAccess(violation, address: entry.address, rkey: entry.rkey, verbIndex: index)
                    }
                    batch.answer(index, nic.perform(entry))
                    s.counters.verbs[entry.kind.verbKind.rawValue] += 1
                    if entry.kind == .read { s.counters.bytesRead += 8 }
                }
            }
        }
    }

    private func executeImmediately(_ verbs: [Verb]) throws(FabricError) -> [VerbResult] {
        var results: [VerbResult] = []
        results.reserveCapacity(verbs.count)
        try state.withLock { (s) throws(FabricError) in
            guard !s.broken else { throw .connectionBroken(nic.node) }
            s.counters.batches += 1
        }
        for (index, verb) in verbs.enumerated() {
            results.append(try executeOne(verb, index: index).get())
        }
        return results
    }

    /// Checks and performs one verb, updating counters and the error state; the check and
    /// the effect happen under `state`'s lock, so they are atomic against `breakConnection()`.
    private func executeOne(_ verb: Verb, index: Int) -> Result<VerbResult, FabricError> {
        let remoteCrashed = simulator.map { $0.faults.isCrashed(nic.node, now: $0.nowNanoseconds) } ?? false
        return state.withLock { s in
            if nic.isPoweredOff || remoteCrashed {
                s.broken = true
                return .failure(.peerDead(nic.node))
            }
            if s.broken { return .failure(.connectionBroken(nic.node)) }
            if let violation = nic.authorize(verb, pd: protectionDomain) {
                s.broken = true
                return .failure(.remoteAccess(violation, address: verb.address, rkey: verb.rkey, verbIndex: index))
            }
            let result = nic.perform(verb)
            s.counters.verbs[verb.kind.rawValue] += 1
            switch verb {
            case .read(_, let length, _, _): s.counters.bytesRead += UInt64(length)
            case .write(_, let bytes, _, _): s.counters.bytesWritten += UInt64(bytes.count)
            default: break
            }
            return .success(result)
        }
    }

    // MARK: Virtual time

    /// One posted batch in virtual time.
    private final class VirtualBatch {
        let verbs: [Verb]
        /// When the batch reaches the memory node's NIC.
        let arrival: UInt64
        /// Whoever awaits the batch; nil once answered (or handed over for delivery).
        var continuation: UnsafeContinuation<Result<[VerbResult], FabricError>, Never>?
        /// The results by posting index, as the verbs execute.
        var results: [VerbResult?]
        /// Verbs of the batch executed so far (in any order).
        var executedCount = 0
        /// Set when the last verb executed or one failed: the outcome and the time the
        /// NIC finished with the batch.
        var finished: (outcome: Result<[VerbResult], FabricError>, at: UInt64)?

        init(verbs: [Verb], arrival: UInt64, continuation: UnsafeContinuation<Result<[VerbResult], FabricError>, Never>) {
            self.verbs = verbs
            self.arrival = arrival
            self.continuation = continuation
            self.results = Array(repeating: nil, count: verbs.count)
        }
    }

    /// One verb in the send queue: a batch and the verb's posting index in it.
    private struct QueuedVerb {
        let batch: VirtualBatch
        let index: Int
        var verb: Verb { batch.verbs[index] }
        func isSame(as other: QueuedVerb) -> Bool { batch === other.batch && index == other.index }
    }

    /// The send queue of a virtual-time connection and the NIC's timing of it.
    private final class SendQueue {
        /// Verbs posted and not executed, in posting order across batches.
        var verbs: [QueuedVerb] = []
        /// Batches posted whose completion is not yet scheduled, in posting order.
        var batches: [VirtualBatch] = []
        /// Virtual time when this connection's previous verb finishes at the NIC.
        var busyUntil: UInt64 = 0
        /// Arrival time of the previous batch: the network does not reorder a QP's packets.
        var lastArrival: UInt64 = 0
        /// When the last READ or atomic of the connection finished (for fenced verbs).
        var lastReadOrAtomicFinish: UInt64?
        /// The verb picked to execute next, whose NIC time is reserved.
        var reserved: QueuedVerb?
        /// Whether a call of `pump` is scheduled (at most one is).
        var pumpScheduled = false
        /// After the local node crashed: how many more of its posted verbs execute.
        var lateVerbsLeft: Int?
        /// Whether the simulator of a scripted run knows this connection.
        var scriptedRegistered = false
    }

    private func startVirtualBatch(
        _ verbs: [Verb], simulator: Simulator,
        continuation: UnsafeContinuation<Result<[VerbResult], FabricError>, Never>
    ) {
        let now = simulator.nowNanoseconds
        if simulator.faults.isCrashed(localNode, now: now) {
            continuation.resume(returning: .failure(.localCrash(executedVerbs: 0)))
            return
        }
        let broken = state.withLock { s -> Bool in
            if !s.broken { s.counters.batches += 1 }
            return s.broken
        }
        if broken {
            continuation.resume(returning: .failure(.connectionBroken(nic.node)))
            return
        }
        if verbs.isEmpty {
            continuation.resume(returning: .success([]))
            return
        }
        if simulator.isScripted {
            let batch = VirtualBatch(verbs: verbs, arrival: now, continuation: continuation)
            queue.batches.append(batch)
            queue.verbs += verbs.indices.map { QueuedVerb(batch: batch, index: $0) }
            if !queue.scriptedRegistered {
                queue.scriptedRegistered = true
                simulator.registerScripted(self)
            }
            return
        }
        let issue = simulator.faults.unstalled(localNode, at: now)
        queue.lastArrival = max(
            queue.lastArrival, issue + simulator.jittered(simulator.latency.oneWayNanos) + simulator.explorationDelay(of: localNode))
        let batch = VirtualBatch(verbs: verbs, arrival: queue.lastArrival, continuation: continuation)
        let idle = queue.verbs.isEmpty
        queue.batches.append(batch)
        queue.verbs += verbs.indices.map { QueuedVerb(batch: batch, index: $0) }
        if idle { schedulePump(at: batch.arrival, simulator: simulator) }
    }

    private func schedulePump(at time: UInt64, simulator: Simulator) {
        precondition(!queue.pumpScheduled, "one pump per connection")
        queue.pumpScheduled = true
        simulator.schedule(at: time, rankedFor: localNode) { [self] in pump(simulator: simulator) }
    }

    /// Runs when the NIC may take the connection's next verb: picks it (by the ordering
    /// rules) and reserves its time at the NIC, or executes the verb picked before.
    private func pump(simulator: Simulator) {
        queue.pumpScheduled = false
        let now = simulator.nowNanoseconds
        if let reserved = queue.reserved {
            queue.reserved = nil
            execute(reserved, simulator: simulator)
            return
        }
        guard let head = queue.verbs.first else { return }
        guard head.batch.arrival <= now else {
            schedulePump(at: head.batch.arrival, simulator: simulator)
            return
        }
        let picked = queue.verbs[nextPosition(now: now, simulator: simulator)]
        let verb = picked.verb
        let service = simulator.latency.serviceNanos(verb)
        var start = max(now, queue.busyUntil)
        if verb.isFenced, let finish = queue.lastReadOrAtomicFinish {
            start = max(start, finish + 2 * simulator.latency.oneWayNanos)
        }
        if verb.kind.isAtomic { start = simulator.reserveAtomicUnit(of: nic.node, from: start, for: service) }
        queue.busyUntil = start + service
        if start > now {
            queue.reserved = picked
            schedulePump(at: start, simulator: simulator)
            return
        }
        execute(picked, simulator: simulator)
    }

    /// The position in the send queue of the verb to execute next: the first one, or the
    /// first WRITE when it may pass the READs and atomics before it and the seeded
    /// generator says so.
    private func nextPosition(now: UInt64, simulator: Simulator) -> Int {
        guard simulator.reordersUnfencedWrites, let head = queue.verbs.first, head.verb.kind != .write,
              let write = queue.verbs.firstIndex(where: { $0.verb.kind == .write }),
              !queue.verbs[write].verb.isFenced, queue.verbs[write].batch.arrival <= now
        else { return 0 }
        return simulator.random(in: 0...1 as ClosedRange<UInt8>) == 0 ? 0 : write
    }

    /// The positions in the send queue of the verbs a scripted run may execute next: the
    /// head, and with `reordering` the first WRITE when it may pass the READs and atomics
    /// before it (the rule of `nextPosition`, with every verb arrived); after a crash, the
    /// verb that was picked when the crash came to light. Empty when nothing is queued.
    func scriptedPositions(reordering: Bool) -> [Int] {
        if let reserved = queue.reserved {
            guard let position = queue.verbs.firstIndex(where: { $0.isSame(as: reserved) }) else {
                preconditionFailure("the reserved verb left the send queue")
            }
            return [position]
        }
        guard let head = queue.verbs.first else { return [] }
        guard reordering, head.verb.kind != .write, let write = queue.verbs.firstIndex(where: { $0.verb.kind == .write }),
              !queue.verbs[write].verb.isFenced
        else { return [0] }
        return [0, write]
    }

    /// Executes the verb at `position` of the send queue now, in a scripted run (one of
    /// `scriptedPositions`).
    func executeScripted(at position: Int, simulator: Simulator) {
        let picked = queue.verbs[position]
        if let reserved = queue.reserved {
            precondition(reserved.isSame(as: picked), "a scripted run must execute the reserved verb first")
            queue.reserved = nil
        }
        execute(picked, simulator: simulator)
    }

    /// Executes `picked` now (its NIC time is reserved), unless the local node crashed.
    private func execute(_ picked: QueuedVerb, simulator: Simulator) {
        let now = simulator.nowNanoseconds
        let verb = picked.verb
        let service = simulator.latency.serviceNanos(verb)
        if queue.lateVerbsLeft == nil,
           simulator.faults.crashesBeforeNextVerb(localNode, executedSoFar: simulator.verbsExecuted(by: localNode), now: now) {
            localNodeCrashed(before: picked, simulator: simulator)
            return
        }
        guard let position = queue.verbs.firstIndex(where: { $0.isSame(as: picked) }) else {
            preconditionFailure("the picked verb left the send queue")
        }
        queue.verbs.remove(at: position)
        let result = executeOne(verb, index: picked.index)
        simulator.record(verb, by: localNode, result: result)
        if verb.kind != .write { queue.lastReadOrAtomicFinish = now + service }
        let batch = picked.batch
        switch result {
        case .failure(let error):
            queue.verbs.removeAll { $0.batch === batch }
            batch.finished = (.failure(error), now + service)
        case .success(let answer):
            batch.results[picked.index] = answer
            batch.executedCount += 1
            if batch.executedCount == batch.verbs.count {
                batch.finished = (.success(batch.results.map { $0! }), now + service)
            }
        }
        if let late = queue.lateVerbsLeft {
            queue.lateVerbsLeft = late - 1
            if late == 1 || (try? result.get()) == nil { queue.verbs.removeAll() }
        }
        if simulator.isScripted {
            deliverFinishedBatchesAtOnce(simulator: simulator)
            return
        }
        if let next = queue.verbs.first {
            schedulePump(at: batch.finished == nil ? now + service : max(now, next.batch.arrival), simulator: simulator)
        }
        deliverFinishedBatches(simulator: simulator)
    }

    /// The local node crashed before `picked` could execute: answers every outstanding
    /// batch and decides how many posted verbs still execute, `picked` first.
    private func localNodeCrashed(before picked: QueuedVerb, simulator: Simulator) {
        let late = switch simulator.faults.lateVerbs(of: localNode) {
        case .seeded: simulator.random(in: 0...queue.verbs.count)
        case .none: 0
        case .all: queue.verbs.count
        }
        queue.lateVerbsLeft = late
        let outstanding = queue.batches
        queue.batches.removeAll()
        if late == 0 { queue.verbs.removeAll() } else {
            // After the node's tasks have seen the crash, at the time reserved for `picked`
            // (in a scripted run: as the next verb of this connection).
            queue.reserved = picked
            if !simulator.isScripted { schedulePump(at: simulator.nowNanoseconds, simulator: simulator) }
        }
        for batch in outstanding {
            let continuation = batch.continuation
            batch.continuation = nil
            continuation?.resume(returning: .failure(.localCrash(executedVerbs: batch.executedCount)))
        }
    }

    /// Answers the finished batches at the head of the queue at once, in posting order (a
    /// scripted run: no crossing back, so the tasks run before the next verb executes).
    private func deliverFinishedBatchesAtOnce(simulator: Simulator) {
        while let batch = queue.batches.first, let (outcome, _) = batch.finished {
            queue.batches.removeFirst()
            guard let continuation = batch.continuation else { continue }
            batch.continuation = nil
            if simulator.faults.isCrashed(localNode, now: simulator.nowNanoseconds) {
                continuation.resume(returning: .failure(.localCrash(executedVerbs: batch.executedCount)))
            } else {
                continuation.resume(returning: outcome)
            }
        }
    }

    /// Schedules the completions of the finished batches at the head of the queue, in
    /// posting order: a batch that finished before an earlier one waits for it.
    private func deliverFinishedBatches(simulator: Simulator) {
        var previousDelivery: UInt64 = 0
        while let batch = queue.batches.first, let (outcome, finish) = batch.finished {
            queue.batches.removeFirst()
            guard let continuation = batch.continuation else { continue }
            batch.continuation = nil
            let readBytes = batch.results.reduce(0) { sum, result in
                if case .read(let bytes)? = result { sum + bytes.count } else { sum }
            }
            let back = finish + simulator.jittered(simulator.latency.oneWayNanos) + simulator.explorationDelay(of: localNode)
                + UInt64(Double(readBytes) / simulator.latency.bytesPerNanosecond)
            let delivery = max(simulator.faults.unstalled(localNode, at: back), previousDelivery)
            previousDelivery = delivery
            let executed = batch.executedCount
            simulator.schedule(at: delivery) { [self] in
                if simulator.faults.isCrashed(localNode, now: simulator.nowNanoseconds) {
                    continuation.resume(returning: .failure(.localCrash(executedVerbs: executed)))
                } else {
                    continuation.resume(returning: outcome)
                }
            }
        }
    }
}
