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

    /// The error state, the counters and the key cache, guarded by `order`: held while a
    /// verb is checked and performed, so that `breakConnection()` waits for a verb in
    /// progress and no verb lands after it. Behind a pointer, so that its accesses carry
    /// no dynamic exclusivity check.
    private let state: UnsafeMutablePointer<State>
    /// Serialises immediate-mode batches of this connection (posting order) and guards
    /// `state`: an immediate-mode batch takes this one lock, whatever its length.
    private let order = Lock()
    /// The virtual-time send queue; touched only on the simulator's thread, behind a
    /// pointer so that its accesses carry no dynamic exclusivity check.
    private let queue: UnsafeMutablePointer<SendQueue>

    private struct State {
        var broken = false
        var counters = FabricCounters()
        /// The grants of the keys this connection used last (`SimulatedNIC.authorize`).
        var keys = SimulatedNIC.KeyCache()
    }

    init(nic: SimulatedNIC, localNode: NodeID, protectionDomain: ProtectionDomain, simulator: Simulator?) {
        self.nic = nic
        self.localNode = localNode
        self.protectionDomain = protectionDomain
        self.simulator = simulator
        queue = .allocate(capacity: 1)
        queue.initialize(to: SendQueue())
        state = .allocate(capacity: 1)
        state.initialize(to: State())
    }

    deinit {
        queue.deinitialize(count: 1)
        queue.deallocate()
        state.deinitialize(count: 1)
        state.deallocate()
    }

    /// Runs `body` on the state, under `order` (held for the verbs of one batch: a few
    /// dozen nanoseconds, so a taken lock is tried again before the thread parks).
    @inline(__always)
    private func withState<Result, Failure: Error>(_ body: (inout State) throws(Failure) -> Result) throws(Failure) -> Result {
        try order.withLockSpinning { () throws(Failure) -> Result in try body(&state.pointee) }
    }

    /// Verb, batch and byte counts so far.
    package var counters: FabricCounters { withState { $0.counters } }

    /// Whether the connection is in the error state.
    package var isBroken: Bool { withState { $0.broken } }

    /// Puts the connection in the error state (a fault, or fencing of its node). A verb
    /// executing on another thread finishes before this returns; every later one fails
    /// with `connectionBroken`, including verbs already posted.
    package func breakConnection() { withState { $0.broken = true } }

    /// A new connection from the same node in the same protection domain and time (so
    /// broken by the same `breakConnections(of:)`), with a lock and a send queue of its own.
    package func sibling() -> (any FabricConnection)? {
        nic.connect(from: localNode, protectionDomain: protectionDomain, simulator: simulator)
    }

    package func post(_ verbs: [Verb]) async throws(FabricError) -> [VerbResult] {
        if let simulator {
            let outcome = await withUnsafeContinuation { (continuation: UnsafeContinuation<Result<[VerbResult], FabricError>, Never>) in
                startVirtualBatch(.verbs(verbs), simulator: simulator, waiter: .verbs(continuation))
            }
            return try outcome.get()
        }
        return try withState { (s) throws(FabricError) -> [VerbResult] in
            try executeImmediately(verbs, state: &s)
        }
    }

    /// In immediate mode, executes the batch on the caller's thread without allocating;
    /// in virtual time, as the same verbs through `post(_:)` would, without an array per
    /// batch or per answer.
    package func post(_ batch: inout WordBatch) async throws(FabricError) {
        guard simulator == nil else {
            return Self.store(try await postWords(batch), in: &batch)
        }
        try withState { (s) throws(FabricError) in
            guard !s.broken else { throw .connectionBroken(nic.node) }
            s.counters.batches += 1
            for index in 0..<batch.count {
                let entry = batch[index]
                if nic.isPoweredOff {
                    s.broken = true
                    throw .peerDead(nic.node)
                }
                if let violation = nic.authorize(entry, pd: protectionDomain, cache: &s.keys) {
                    s.broken = true
                    throw .remoteAccess(violation, address: entry.address, rkey: entry.rkey, verbIndex: index)
                }
                batch.answer(index, nic.perform(entry))
                s.counters.verbs[entry.kind.verbKind.rawValue] += 1
                if entry.kind == .read { s.counters.bytesRead += 8 }
            }
        }
    }

    /// In immediate mode, copies without allocating, under the connection's lock as a
    /// batch of one READ; in virtual time, as `post(_:)` of the READ.
    package func read(_ address: RemoteAddress, rkey: RKey, into destination: UnsafeMutableRawBufferPointer) async throws(FabricError) {
        guard simulator == nil else {
            let bytes = try await post([.read(address, length: destination.count, rkey: rkey)])[0].bytes
            destination.copyBytes(from: bytes)
            return
        }
        try withState { (s) throws(FabricError) in
            try checkTransfer(.read, address: address, length: destination.count, rkey: rkey, state: &s)
            nic.copy(from: address, into: destination)
            s.counters.verbs[VerbKind.read.rawValue] += 1
            s.counters.bytesRead += UInt64(destination.count)
        }
    }

    /// In immediate mode, copies without allocating, as `read(_:rkey:into:)` does.
    package func write(_ address: RemoteAddress, rkey: RKey, from source: UnsafeRawBufferPointer) async throws(FabricError) {
        guard simulator == nil else {
            _ = try await post([.write(address, bytes: Array(source), rkey: rkey)])
            return
        }
        try withState { (s) throws(FabricError) in
            try checkTransfer(.write, address: address, length: source.count, rkey: rkey, state: &s)
            nic.copy(source, to: address)
            s.counters.verbs[VerbKind.write.rawValue] += 1
            s.counters.bytesWritten += UInt64(source.count)
        }
    }

    /// The checks of a one-verb batch of a READ or WRITE in immediate mode (those of
    /// `executeOne`), counting the batch.
    @inline(__always)
    private func checkTransfer(_ access: RemoteAccess, address: RemoteAddress, length: Int, rkey: RKey, state s: inout State) throws(FabricError) {
        guard !s.broken else { throw .connectionBroken(nic.node) }
        s.counters.batches += 1
        if nic.isPoweredOff {
            s.broken = true
            throw .peerDead(nic.node)
        }
        if let violation = nic.authorize(access, length: length, address: address, rkey: rkey, pd: protectionDomain, cache: &s.keys) {
            s.broken = true
            throw .remoteAccess(violation, address: address, rkey: rkey, verbIndex: 0)
        }
    }

    /// Posts the verbs of `batch` in virtual time and answers their words (out of line:
    /// the immediate-mode path of `post(_:)` stays small).
    @inline(never)
    private func postWords(_ batch: WordBatch) async throws(FabricError) -> WordAnswers {
        let simulator = simulator!
        let outcome = await withUnsafeContinuation { (continuation: UnsafeContinuation<Result<WordAnswers, FabricError>, Never>) in
            startVirtualBatch(.words(batch), simulator: simulator, waiter: .words(continuation))
        }
        return try outcome.get()
    }

    /// Stores the answers of a word batch posted in virtual time.
    @inline(never)
    private static func store(_ answers: WordAnswers, in batch: inout WordBatch) {
        for index in 0..<batch.count { batch.answer(index, answers[index]) }
    }

    private func executeImmediately(_ verbs: [Verb], state s: inout State) throws(FabricError) -> [VerbResult] {
        var results: [VerbResult] = []
        results.reserveCapacity(verbs.count)
        guard !s.broken else { throw .connectionBroken(nic.node) }
        s.counters.batches += 1
        for (index, verb) in verbs.enumerated() {
            results.append(try executeOne(verb, index: index, state: &s) { nic.perform($0) })
        }
        return results
    }

    /// Checks and performs one verb, updating counters and the error state; the caller
    /// holds `order` (it passes the state), so the check and the effect (`perform`, which
    /// answers what the verb answered) are atomic against `breakConnection()`.
    @inline(__always)
    private func executeOne<Answer>(_ verb: Verb, index: Int, state s: inout State, perform: (Verb) -> Answer) throws(FabricError) -> Answer {
        let remoteCrashed = simulator.map { $0.faults.isCrashed(nic.node, now: $0.nowNanoseconds) } ?? false
        if nic.isPoweredOff || remoteCrashed {
            s.broken = true
            throw .peerDead(nic.node)
        }
        if s.broken { throw .connectionBroken(nic.node) }
        if let violation = nic.authorize(verb, pd: protectionDomain, cache: &s.keys) {
            s.broken = true
            throw .remoteAccess(violation, address: verb.address, rkey: verb.rkey, verbIndex: index)
        }
        let answer = perform(verb)
        s.counters.verbs[verb.kind.rawValue] += 1
        switch verb {
        case .read(_, let length, _, _): s.counters.bytesRead += UInt64(length)
        case .write(_, let bytes, _, _): s.counters.bytesWritten += UInt64(bytes.count)
        default: break
        }
        return answer
    }

    // MARK: Virtual time

    /// The answers of a word batch, by posting index.
    typealias WordAnswers = InlineArray<4, UInt64>

    /// What a batch's poster awaits: the general verbs' results or a word batch's answers.
    fileprivate enum Waiter {
        case none
        case verbs(UnsafeContinuation<Result<[VerbResult], FabricError>, Never>)
        case words(UnsafeContinuation<Result<WordAnswers, FabricError>, Never>)

        /// Resumes the poster with `outcome` (nothing when there is none).
        func resume(_ outcome: Outcome) {
            switch (self, outcome) {
            case (.none, _): break
            case (.verbs(let continuation), .failure(let error)): continuation.resume(returning: .failure(error))
            case (.words(let continuation), .failure(let error)): continuation.resume(returning: .failure(error))
            case (.verbs(let continuation), .verbs(let results)): continuation.resume(returning: .success(results))
            case (.words(let continuation), .words(let answers)): continuation.resume(returning: .success(answers))
            case (.verbs, .words), (.words, .verbs): preconditionFailure("a batch answered as another kind")
            }
        }
    }

    /// A finished batch's outcome.
    fileprivate enum Outcome {
        case failure(FabricError)
        case verbs([VerbResult])
        case words(WordAnswers)
    }

    /// The verbs of a batch as posted.
    private enum Posted {
        case verbs([Verb])
        case words(WordBatch)

        var count: Int {
            switch self {
            case .verbs(let verbs): verbs.count
            case .words(let batch): batch.count
            }
        }

        func verb(at index: Int) -> Verb {
            switch self {
            case .verbs(let verbs): verbs[index]
            case .words(let batch): batch.verb(at: index)
            }
        }
    }

    /// A finished batch on its way back to its poster: the payload of its completion timer.
    struct Delivery {
        fileprivate let waiter: Waiter
        fileprivate let outcome: Outcome
        fileprivate let executedVerbs: Int
    }

    /// One posted batch in virtual time, kept by serial number in the send queue.
    private struct VirtualBatch {
        /// When the batch reaches the memory node's NIC.
        let arrival: UInt64
        let verbCount: Int
        /// Whether it is a word batch (answers in `words`) or general verbs (`results`).
        let isWords: Bool
        /// Whoever awaits the batch; `.none` once answered (or handed over for delivery).
        var waiter: Waiter
        /// Verbs of the batch executed so far (in any order).
        var executedCount = 0
        /// Bytes its executed READs answered.
        var readBytes = 0
        var words = WordAnswers(repeating: 0)
        var results: [VerbResult?]
        /// Set when the last verb executed or one failed: the error, if any, and the time
        /// the NIC finished with the batch.
        var finished: (error: FabricError?, at: UInt64)?

        /// The outcome of a finished batch.
        var outcome: Outcome {
            if let error = finished?.error { return .failure(error) }
            return isWords ? .words(words) : .verbs(results.map { $0! })
        }
    }

    /// One verb in the send queue: its batch's serial number, its posting index in the
    /// batch, and the batch's arrival.
    private struct QueuedVerb {
        let verb: Verb
        let batch: UInt64
        let index: Int
        let arrival: UInt64
        func isSame(as other: QueuedVerb) -> Bool { batch == other.batch && index == other.index }
    }

    /// The send queue of a virtual-time connection and the NIC's timing of it.
    private struct SendQueue {
        /// Verbs posted and not executed, in posting order across batches: the elements
        /// from `verbHead` on.
        private var verbs: [QueuedVerb] = []
        private var verbHead = 0
        /// How many of them are WRITEs (none: no WRITE can pass anything).
        private(set) var writesQueued = 0
        /// Batches by serial number, the first being `batchBase`: the ones posted whose
        /// completion is not yet scheduled (serials `pendingFrom` on), after the ones
        /// handed over whose verbs may still be queued (late verbs after a crash).
        private var batches: [VirtualBatch] = []
        private var batchBase: UInt64 = 0
        /// The first batch whose completion is not yet scheduled.
        var pendingFrom: UInt64 = 0
        private(set) var nextSerial: UInt64 = 0
        /// Virtual time when this connection's previous verb finishes at the NIC.
        var busyUntil: UInt64 = 0
        /// Arrival time of the previous batch: the network does not reorder a QP's packets.
        var lastArrival: UInt64 = 0
        /// When the completion scheduled last is delivered: a QP's completions come in
        /// posting order, so no later batch's is delivered before it.
        var lastDelivery: UInt64 = 0
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

        var verbCount: Int { verbs.count - verbHead }
        var firstVerb: QueuedVerb? { verbHead < verbs.count ? verbs[verbHead] : nil }
        func verb(at position: Int) -> QueuedVerb { verbs[verbHead + position] }

        /// The position of the first WRITE, if any.
        func firstWritePosition() -> Int? {
            guard writesQueued > 0 else { return nil }
            return verbs[verbHead...].firstIndex { $0.verb.kind == .write }.map { $0 - verbHead }
        }

        /// The position of `verb` in the queue, if it is there.
        func position(of verb: QueuedVerb) -> Int? {
            if let first = firstVerb, first.isSame(as: verb) { return 0 }
            return verbs[verbHead...].firstIndex { $0.isSame(as: verb) }.map { $0 - verbHead }
        }

        /// Appends a batch and its verbs; answers its serial number.
        mutating func append(_ posted: Posted, arrival: UInt64, waiter: Waiter) {
            let serial = nextSerial
            nextSerial += 1
            let isWords = if case .words = posted { true } else { false }
            batches.append(VirtualBatch(
                arrival: arrival, verbCount: posted.count, isWords: isWords, waiter: waiter,
                results: isWords ? [] : Array(repeating: nil, count: posted.count)))
            for index in 0..<posted.count {
                let verb = posted.verb(at: index)
                if verb.kind == .write { writesQueued += 1 }
                verbs.append(QueuedVerb(verb: verb, batch: serial, index: index, arrival: arrival))
            }
        }

        mutating func removeVerb(at position: Int) {
            if verbs[verbHead + position].verb.kind == .write { writesQueued -= 1 }
            guard position == 0 else {
                verbs.remove(at: verbHead + position)
                return
            }
            verbHead += 1
            if verbHead == verbs.count { removeAllVerbs() }
        }

        mutating func removeAllVerbs() {
            verbs.removeAll(keepingCapacity: true)
            verbHead = 0
            writesQueued = 0
        }

        /// Drops the queued verbs of batch `serial`.
        mutating func removeVerbs(ofBatch serial: UInt64) {
            verbs.removeSubrange(0..<verbHead)
            verbHead = 0
            verbs.removeAll { $0.batch == serial }
            writesQueued = verbs.count { $0.verb.kind == .write }
        }

        /// The batch with serial number `serial` (posted, and still kept).
        subscript(batch serial: UInt64) -> VirtualBatch {
            get { batches[Int(serial - batchBase)] }
            _modify { yield &batches[Int(serial - batchBase)] }
        }

        /// Forgets the batches handed over that no queued verb belongs to.
        mutating func dropHandedOverBatches() {
            let keepFrom = min(pendingFrom, firstVerb?.batch ?? nextSerial)
            let drop = Int(keepFrom - batchBase)
            guard drop > 0, drop == batches.count || drop >= 32 else { return }
            if drop == batches.count { batches.removeAll(keepingCapacity: true) } else { batches.removeFirst(drop) }
            batchBase = keepFrom
        }
    }

    private func startVirtualBatch(_ posted: Posted, simulator: Simulator, waiter: Waiter) {
        let now = simulator.nowNanoseconds
        if simulator.faults.isCrashed(localNode, now: now) {
            waiter.resume(.failure(.localCrash(executedVerbs: 0)))
            return
        }
        let broken = withState { s -> Bool in
            if !s.broken { s.counters.batches += 1 }
            return s.broken
        }
        if broken {
            waiter.resume(.failure(.connectionBroken(nic.node)))
            return
        }
        if posted.count == 0 {
            let empty: Outcome = if case .words = posted { .words(WordAnswers(repeating: 0)) } else { .verbs([]) }
            waiter.resume(empty)
            return
        }
        let queue = queue
        if simulator.isScripted {
            queue.pointee.append(posted, arrival: now, waiter: waiter)
            if !queue.pointee.scriptedRegistered {
                queue.pointee.scriptedRegistered = true
                simulator.registerScripted(self)
            }
            return
        }
        let issue = simulator.faults.unstalled(localNode, at: now)
        queue.pointee.lastArrival = max(
            queue.pointee.lastArrival, issue + simulator.jittered(simulator.latency.oneWayNanos) + simulator.explorationDelay(of: localNode))
        let arrival = queue.pointee.lastArrival
        let idle = queue.pointee.verbCount == 0
        queue.pointee.append(posted, arrival: arrival, waiter: waiter)
        if idle { schedulePump(at: arrival, simulator: simulator) }
    }

    private func schedulePump(at time: UInt64, simulator: Simulator) {
        precondition(!queue.pointee.pumpScheduled, "one pump per connection")
        queue.pointee.pumpScheduled = true
        simulator.schedule(at: time, rankedFor: localNode, .pump(self))
    }

    /// Runs when the NIC may take the connection's next verb: picks it (by the ordering
    /// rules) and reserves its time at the NIC, or executes the verb picked before.
    func pump(simulator: Simulator) {
        let queue = queue
        queue.pointee.pumpScheduled = false
        let now = simulator.nowNanoseconds
        if let reserved = queue.pointee.reserved {
            queue.pointee.reserved = nil
            execute(reserved, simulator: simulator)
            return
        }
        guard let head = queue.pointee.firstVerb else { return }
        guard head.arrival <= now else {
            schedulePump(at: head.arrival, simulator: simulator)
            return
        }
        let picked = queue.pointee.verb(at: nextPosition(now: now, simulator: simulator))
        let verb = picked.verb
        let service = simulator.latency.serviceNanos(verb)
        var start = max(now, queue.pointee.busyUntil)
        if verb.isFenced, let finish = queue.pointee.lastReadOrAtomicFinish {
            start = max(start, finish + 2 * simulator.latency.oneWayNanos)
        }
        if verb.kind.isAtomic { start = simulator.reserveAtomicUnit(of: nic.node, from: start, for: service) }
        queue.pointee.busyUntil = start + service
        if start > now {
            queue.pointee.reserved = picked
            schedulePump(at: start, simulator: simulator)
            return
        }
        execute(picked, simulator: simulator)
    }

    /// The position in the send queue of the verb to execute next: the first one, or the
    /// first WRITE when it may pass the READs and atomics before it and the seeded
    /// generator says so.
    private func nextPosition(now: UInt64, simulator: Simulator) -> Int {
        let queue = queue
        guard queue.pointee.writesQueued > 0, simulator.reordersUnfencedWrites, let head = queue.pointee.firstVerb, head.verb.kind != .write,
              let write = queue.pointee.firstWritePosition(),
              !queue.pointee.verb(at: write).verb.isFenced, queue.pointee.verb(at: write).arrival <= now
        else { return 0 }
        return simulator.random(in: 0...1 as ClosedRange<UInt8>) == 0 ? 0 : write
    }

    /// The positions in the send queue of the verbs a scripted run may execute next: the
    /// head, and with `reordering` the first WRITE when it may pass the READs and atomics
    /// before it (the rule of `nextPosition`, with every verb arrived); after a crash, the
    /// verb that was picked when the crash came to light. Empty when nothing is queued.
    func scriptedPositions(reordering: Bool) -> [Int] {
        let queue = queue
        if let reserved = queue.pointee.reserved {
            guard let position = queue.pointee.position(of: reserved) else {
                preconditionFailure("the reserved verb left the send queue")
            }
            return [position]
        }
        guard let head = queue.pointee.firstVerb else { return [] }
        guard reordering, head.verb.kind != .write, let write = queue.pointee.firstWritePosition(),
              !queue.pointee.verb(at: write).verb.isFenced
        else { return [0] }
        return [0, write]
    }

    /// Executes the verb at `position` of the send queue now, in a scripted run (one of
    /// `scriptedPositions`).
    func executeScripted(at position: Int, simulator: Simulator) {
        let picked = queue.pointee.verb(at: position)
        if let reserved = queue.pointee.reserved {
            precondition(reserved.isSame(as: picked), "a scripted run must execute the reserved verb first")
            queue.pointee.reserved = nil
        }
        execute(picked, simulator: simulator)
    }

    /// Executes `picked` now (its NIC time is reserved), unless the local node crashed.
    private func execute(_ picked: QueuedVerb, simulator: Simulator) {
        let queue = queue
        let now = simulator.nowNanoseconds
        let verb = picked.verb
        let service = simulator.latency.serviceNanos(verb)
        if queue.pointee.lateVerbsLeft == nil,
           simulator.faults.crashesBeforeNextVerb(localNode, executedSoFar: simulator.verbsExecuted(by: localNode), now: now) {
            localNodeCrashed(before: picked, simulator: simulator)
            return
        }
        guard let position = queue.pointee.position(of: picked) else {
            preconditionFailure("the picked verb left the send queue")
        }
        queue.pointee.removeVerb(at: position)
        var failure: FabricError?
        do throws(FabricError) {
            if queue.pointee[batch: picked.batch].isWords {
                let word = try withState { (s) throws(FabricError) in try executeOne(verb, index: picked.index, state: &s) { nic.performWord($0) } }
                simulator.record(verb, by: localNode, word: word)
                let changed = switch verb {
                case .compareAndSwap(_, let expected, _, _, _): word == expected
                case .read: false
                case .write, .fetchAndAdd: true
                }
                simulator.executed(verb, on: nic.node, changed: changed)
                queue.pointee[batch: picked.batch].words[picked.index] = word
            } else {
                let result = try withState { (s) throws(FabricError) in try executeOne(verb, index: picked.index, state: &s) { nic.perform($0) } }
                simulator.record(verb, by: localNode, result: .success(result))
                let changed = switch result {
                case .compareAndSwap(let exchanged, _): exchanged
                case .read: false
                case .written, .fetchAndAdd: true
                }
                simulator.executed(verb, on: nic.node, changed: changed)
                queue.pointee[batch: picked.batch].results[picked.index] = result
            }
            if case .read(_, let length, _, _) = verb { queue.pointee[batch: picked.batch].readBytes += length }
            queue.pointee[batch: picked.batch].executedCount += 1
        } catch {
            simulator.record(verb, by: localNode, result: .failure(error))
            failure = error
        }
        if verb.kind != .write { queue.pointee.lastReadOrAtomicFinish = now + service }
        if let failure {
            queue.pointee.removeVerbs(ofBatch: picked.batch)
            queue.pointee[batch: picked.batch].finished = (failure, now + service)
        } else if queue.pointee[batch: picked.batch].executedCount == queue.pointee[batch: picked.batch].verbCount {
            queue.pointee[batch: picked.batch].finished = (nil, now + service)
        }
        if let late = queue.pointee.lateVerbsLeft {
            queue.pointee.lateVerbsLeft = late - 1
            if late == 1 || failure != nil { queue.pointee.removeAllVerbs() }
        }
        if simulator.isScripted {
            deliverFinishedBatchesAtOnce(simulator: simulator)
            return
        }
        if let next = queue.pointee.firstVerb {
            let finished = queue.pointee[batch: picked.batch].finished != nil
            schedulePump(at: finished ? max(now, next.arrival) : now + service, simulator: simulator)
        }
        deliverFinishedBatches(simulator: simulator)
    }

    /// The local node crashed before `picked` could execute: answers every outstanding
    /// batch and decides how many posted verbs still execute, `picked` first.
    private func localNodeCrashed(before picked: QueuedVerb, simulator: Simulator) {
        let queue = queue
        let late = switch simulator.faults.lateVerbs(of: localNode) {
        case .seeded: simulator.random(in: 0...queue.pointee.verbCount)
        case .none: 0
        case .all: queue.pointee.verbCount
        }
        queue.pointee.lateVerbsLeft = late
        let outstanding = queue.pointee.pendingFrom..<queue.pointee.nextSerial
        queue.pointee.pendingFrom = queue.pointee.nextSerial
        if late == 0 { queue.pointee.removeAllVerbs() } else {
            // After the node's tasks have seen the crash, at the time reserved for `picked`
            // (in a scripted run: as the next verb of this connection).
            queue.pointee.reserved = picked
            if !simulator.isScripted { schedulePump(at: simulator.nowNanoseconds, simulator: simulator) }
        }
        for serial in outstanding {
            let waiter = queue.pointee[batch: serial].waiter
            queue.pointee[batch: serial].waiter = .none
            waiter.resume(.failure(.localCrash(executedVerbs: queue.pointee[batch: serial].executedCount)))
        }
        queue.pointee.dropHandedOverBatches()
    }

    /// Answers the finished batches at the head of the queue at once, in posting order (a
    /// scripted run: no crossing back, so the tasks run before the next verb executes).
    private func deliverFinishedBatchesAtOnce(simulator: Simulator) {
        let queue = queue
        while queue.pointee.pendingFrom < queue.pointee.nextSerial, queue.pointee[batch: queue.pointee.pendingFrom].finished != nil {
            let serial = queue.pointee.pendingFrom
            queue.pointee.pendingFrom += 1
            let batch = queue.pointee[batch: serial]
            queue.pointee[batch: serial].waiter = .none
            if simulator.faults.isCrashed(localNode, now: simulator.nowNanoseconds) {
                batch.waiter.resume(.failure(.localCrash(executedVerbs: batch.executedCount)))
            } else {
                batch.waiter.resume(batch.outcome)
            }
        }
        queue.pointee.dropHandedOverBatches()
    }

    /// Schedules the completions of the finished batches at the head of the queue, in
    /// posting order: a batch that finished before an earlier one waits for it, whether or
    /// not that one's completion was scheduled in the same call (a small batch after a
    /// large READ finishes first at the NIC, but the READ's payload crosses back first).
    private func deliverFinishedBatches(simulator: Simulator) {
        let queue = queue
        while queue.pointee.pendingFrom < queue.pointee.nextSerial, let finished = queue.pointee[batch: queue.pointee.pendingFrom].finished {
            let serial = queue.pointee.pendingFrom
            queue.pointee.pendingFrom += 1
            let batch = queue.pointee[batch: serial]
            if case .none = batch.waiter { continue }
            queue.pointee[batch: serial].waiter = .none
            let back = finished.at + simulator.jittered(simulator.latency.oneWayNanos) + simulator.explorationDelay(of: localNode)
                + UInt64(Double(batch.readBytes) / simulator.latency.bytesPerNanosecond)
            let delivery = max(simulator.faults.unstalled(localNode, at: back), queue.pointee.lastDelivery)
            queue.pointee.lastDelivery = delivery
            simulator.schedule(at: delivery, .deliver(self, Delivery(waiter: batch.waiter, outcome: batch.outcome, executedVerbs: batch.executedCount)))
        }
        queue.pointee.dropHandedOverBatches()
    }

    /// Hands a delivered batch to its poster (the completion timer of `deliverFinishedBatches`).
    func deliver(_ delivery: Delivery, simulator: Simulator) {
        if simulator.faults.isCrashed(localNode, now: simulator.nowNanoseconds) {
            delivery.waiter.resume(.failure(.localCrash(executedVerbs: delivery.executedVerbs)))
        } else {
            delivery.waiter.resume(delivery.outcome)
        }
    }
}
