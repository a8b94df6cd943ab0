/// A reliable connection to a `SimulatedNIC`.
///
/// Without a simulator (immediate mode) a batch executes on the caller's thread with real
/// atomics, safe under real concurrency; batches of one connection execute in posting
/// order. With a `Simulator` (virtual time) each verb executes at the virtual time the
/// latency model gives, interleaved with other connections' verbs, and fault injection
/// applies. After a remote access error the connection stays broken (QP error state).
package final class SimulatedConnection: FabricConnection, @unchecked Sendable {
    package let nic: SimulatedNIC
    package let localNode: NodeID
    package let protectionDomain: ProtectionDomain
    package var remoteNode: NodeID { nic.node }
    let simulator: Simulator?

    private let state = Locked(State())
    /// Serialises immediate-mode batches of this connection (posting order).
    private let order = Lock()

    private struct State {
        var broken = false
        var counters = FabricCounters()
        /// Virtual time when this connection's previous verb finishes at the NIC.
        var busyUntil: UInt64 = 0
        /// Arrival time of the previous batch: a QP never reorders its own work requests.
        var lastArrival: UInt64 = 0
        /// Batches posted and not yet fully executed, in posting order: the send queue.
        /// Only the first executes; the next starts when it is done.
        var sendQueue: [VirtualBatch] = []
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

    /// Puts the connection in the error state (a fault, or fencing of its node).
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

    /// Checks and performs one verb, updating counters and the error state.
    private func executeOne(_ verb: Verb, index: Int) -> Result<VerbResult, FabricError> {
        let remoteCrashed = simulator.map { $0.faults.isCrashed(nic.node, now: $0.nowNanoseconds) } ?? false
        if nic.isPoweredOff || remoteCrashed {
            state.withLock { $0.broken = true }
            return .failure(.peerDead(nic.node))
        }
        let broken = state.withLock { $0.broken }
        if broken { return .failure(.connectionBroken(nic.node)) }
        if let violation = nic.authorize(verb, pd: protectionDomain) {
            state.withLock { $0.broken = true }
            return .failure(.remoteAccess(violation, address: verb.address, rkey: verb.rkey, verbIndex: index))
        }
        let result = nic.perform(verb)
        state.withLock { s in
            s.counters.verbs[verb.kind.rawValue] += 1
            switch verb {
            case .read(_, let length, _): s.counters.bytesRead += UInt64(length)
            case .write(_, let bytes, _): s.counters.bytesWritten += UInt64(bytes.count)
            default: break
            }
        }
        return .success(result)
    }

    // MARK: Virtual time

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
        let issue = simulator.faults.unstalled(localNode, at: now)
        let arrival = state.withLock { s -> UInt64 in
            s.lastArrival = max(s.lastArrival, issue + simulator.jittered(simulator.latency.oneWayNanos))
            return s.lastArrival
        }
        let batch = VirtualBatch(verbs: verbs, arrival: arrival, continuation: continuation)
        let first = state.withLock { s -> Bool in
            s.sendQueue.append(batch)
            return s.sendQueue.count == 1
        }
        if first { simulator.schedule(at: arrival) { [self] in executeVirtual(batch, simulator: simulator) } }
    }

    private final class VirtualBatch {
        let verbs: [Verb]
        let arrival: UInt64
        let continuation: UnsafeContinuation<Result<[VerbResult], FabricError>, Never>
        var results: [VerbResult] = []
        var reservedStart: UInt64?
        init(verbs: [Verb], arrival: UInt64, continuation: UnsafeContinuation<Result<[VerbResult], FabricError>, Never>) {
            self.verbs = verbs
            self.arrival = arrival
            self.continuation = continuation
        }
    }

    /// The head batch has executed its last verb (or failed): start the next one.
    private func startNextBatch(simulator: Simulator) {
        let next = state.withLock { s -> VirtualBatch? in
            s.sendQueue.removeFirst()
            return s.sendQueue.first
        }
        if let next {
            simulator.schedule(at: max(simulator.nowNanoseconds, next.arrival)) { [self] in executeVirtual(next, simulator: simulator) }
        }
    }

    /// Runs at the time the next verb of `batch` may start at the NIC.
    private func executeVirtual(_ batch: VirtualBatch, simulator: Simulator) {
        let now = simulator.nowNanoseconds
        let verb = batch.verbs[batch.results.count]
        let service = simulator.latency.serviceNanos(verb)
        if batch.reservedStart == nil {
            var start = max(now, state.withLock { $0.busyUntil })
            if verb.kind.isAtomic { start = simulator.reserveAtomicUnit(of: nic.node, from: start, for: service) }
            state.withLock { $0.busyUntil = start + service }
            if start > now {
                batch.reservedStart = start
                simulator.schedule(at: start) { [self] in executeVirtual(batch, simulator: simulator) }
                return
            }
        }
        batch.reservedStart = nil
        let index = batch.results.count
        if simulator.faults.crashesBeforeNextVerb(localNode, executedSoFar: simulator.verbsExecuted(by: localNode), now: now) {
            startNextBatch(simulator: simulator)
            batch.continuation.resume(returning: .failure(.localCrash(executedVerbs: index)))
            return
        }
        let result = executeOne(verb, index: index)
        simulator.record(verb, by: localNode, result: result)
        switch result {
        case .failure(let error):
            startNextBatch(simulator: simulator)
            complete(batch, with: .failure(error), at: now + service, simulator: simulator)
        case .success(let answer):
            batch.results.append(answer)
            if batch.results.count == batch.verbs.count {
                startNextBatch(simulator: simulator)
                complete(batch, with: .success(batch.results), at: now + service, simulator: simulator)
            } else {
                simulator.schedule(at: now + service) { [self] in executeVirtual(batch, simulator: simulator) }
            }
        }
    }

    private func complete(
        _ batch: VirtualBatch, with outcome: Result<[VerbResult], FabricError>, at finish: UInt64, simulator: Simulator
    ) {
        let readBytes = batch.results.reduce(0) { sum, r in
            if case .read(let bytes) = r { sum + bytes.count } else { sum }
        }
        let back = finish + simulator.jittered(simulator.latency.oneWayNanos)
            + UInt64(Double(readBytes) / simulator.latency.bytesPerNanosecond)
        let delivery = simulator.faults.unstalled(localNode, at: back)
        simulator.schedule(at: delivery) { [self] in
            if simulator.faults.isCrashed(localNode, now: simulator.nowNanoseconds) {
                batch.continuation.resume(returning: .failure(.localCrash(executedVerbs: batch.results.count)))
            } else {
                batch.continuation.resume(returning: outcome)
            }
        }
    }
}
