/// A deterministic discrete-event runtime: one thread, a virtual clock, a seeded random
/// generator, and a task executor that runs every job of every task it owns in FIFO order
/// (in a seeded order under schedule exploration). Under `ScheduleExploration.scripted`
/// the order in which NICs execute verbs of different connections comes from a choice
/// sequence instead of the clock (see `ScriptedScheduler`).
///
/// All simulated work must start with `spawn` (which uses `Task(executorPreference:)`);
/// child tasks and `async let` inherit the preference. `run()` drains ready jobs, then
/// advances the clock to the earliest timer, and so on until nothing is left. The same
/// seed (and, within the package, the same `ScheduleExploration`) gives the same run, bit
/// for bit: `traceHash` folds in every verb a simulated NIC executes (time, node, kind,
/// address, answer).
///
/// ```swift
/// let simulator = Simulator(seed: 42)
/// simulator.spawn {
///     await simulator.sleep(nanoseconds: 1_000)
///     // ... protocol code on simulated connections ...
/// }
/// simulator.run()
/// print(simulator.nowNanoseconds, simulator.traceHash)
/// ```
public final class Simulator: TaskExecutor, SerialExecutor, Runtime, @unchecked Sendable {
    /// The seed this run was created with; print it when a check fails.
    public let seed: UInt64
    /// The latency model that virtual-time connections use.
    package let latency: LatencyModel
    /// Faults that apply from now on (crashes, stalls, broken links).
    package let faults = FaultPlan()
    /// How this run explores schedules (`.none`: as the latency model and seed give).
    package let exploration: ScheduleExploration
    /// Whether an unfenced WRITE may pass earlier READs and atomics of its connection, as
    /// on a real QP (see `SimulatedConnection`). On by default; turn it off before the run
    /// starts to tell whether a failing seed needs a reordered WRITE (the run changes).
    /// In a scripted run, a WRITE that may pass is one more option of a choice point.
    package var reordersUnfencedWrites = true
    /// In a scripted run, the most verbs `run()` executes: at this count it stops and
    /// answers false (a run that does not end, such as a livelock, stays bounded). No
    /// bound by default; ignored without `.scripted`.
    package var scriptedVerbsMax: UInt64 = .max

    private let readyJobs = Locked(JobQueue())
    private var timers = TimerHeap()
    private var now: UInt64 = 0
    private var randomSource: SeededRandom
    private var explorer: PriorityExplorer?
    private var scripted: ScriptedScheduler?
    private var atomicUnitFreeAt: [NodeID: UInt64] = [:]
    private var verbsExecuted: [NodeID: UInt64] = [:]
    public private(set) var traceHash = TraceHash()
    /// Verbs executed by all simulated NICs in this run.
    package private(set) var totalVerbs: UInt64 = 0

    private struct JobQueue {
        var jobs: [UnownedJob] = []
        var head = 0
        var count: Int { jobs.count - head }
        mutating func push(_ job: UnownedJob) { jobs.append(job) }
        /// Takes the job `offset` places behind the head (the head itself by default).
        mutating func pop(offset: Int = 0) -> UnownedJob? {
            guard head < jobs.count else { return nil }
            if offset > 0 { jobs.swapAt(head, head + offset) }
            defer {
                head += 1
                if head == jobs.count { jobs.removeAll(keepingCapacity: true); head = 0 }
            }
            return jobs[head]
        }
    }

    /// A simulator whose run is determined by `seed`, with the default latency model.
    public convenience init(seed: UInt64) {
        self.init(seed: seed, latency: LatencyModel())
    }

    /// A simulator whose run is determined by `seed` and `exploration`, with `latency`.
    package init(seed: UInt64, latency: LatencyModel, exploration: ScheduleExploration = .none) {
        self.seed = seed
        self.latency = latency
        self.exploration = exploration
        self.randomSource = SeededRandom(seed: seed)
        switch exploration {
        case .none: break
        case .randomPriorities(let changePoints, let horizonVerbs):
            explorer = PriorityExplorer(
                seed: seed, changePoints: changePoints, horizonVerbs: horizonVerbs, spreadNanoseconds: 4 * latency.oneWayNanos)
        case .scripted(let script):
            scripted = ScriptedScheduler(script: script)
        }
    }

    // MARK: Executor

    public func enqueue(_ job: consuming ExecutorJob) {
        let unowned = UnownedJob(job)
        readyJobs.withLock { $0.push(unowned) }
    }

    public func asUnownedSerialExecutor() -> UnownedSerialExecutor {
        UnownedSerialExecutor(ordinary: self)
    }

    // MARK: Runtime

    public func spawn(_ body: @escaping @Sendable () async -> Void) {
        Task(executorPreference: self) { await body() }
    }

    public func sleep(nanoseconds: UInt64) async {
        await withUnsafeContinuation { (continuation: UnsafeContinuation<Void, Never>) in
            schedule(at: now + nanoseconds) { continuation.resume() }
        }
    }

    public var nowNanoseconds: UInt64 { now }

    // MARK: Driving

    /// Runs until no job and no timer is left, or until the clock would pass `deadline`.
    /// Returns whether the simulation ran out of work (as opposed to reaching the deadline,
    /// or, in a scripted run, `scriptedVerbsMax`).
    @discardableResult
    public func run(untilNanoseconds deadline: UInt64 = .max) -> Bool {
        if let scripted { return runScripted(scripted, untilNanoseconds: deadline) }
        while true {
            runReadyJobs()
            guard let next = timers.peek() else { return true }
            if next.time > deadline { now = deadline; return false }
            _ = timers.pop()
            now = next.time
            next.action()
        }
    }

    /// Runs every ready job, and every job they make ready, until none is left.
    private func runReadyJobs() {
        while let job = nextJob() {
            job.runSynchronously(isolatedTo: asUnownedSerialExecutor(), taskExecutor: asUnownedTaskExecutor())
        }
    }

    /// `run(untilNanoseconds:)` of a scripted run (see `ScriptedScheduler`): tasks until
    /// every one waits, then one verb (the script picks among several), and only when no
    /// verb is left, the timers due first, all together.
    private func runScripted(_ scripted: ScriptedScheduler, untilNanoseconds deadline: UInt64) -> Bool {
        while true {
            runReadyJobs()
            if let (connection, position) = scripted.nextVerb(reordering: reordersUnfencedWrites) {
                guard totalVerbs < scriptedVerbsMax else { return false }
                connection.executeScripted(at: position, simulator: self)
                continue
            }
            guard let next = timers.peek() else { return true }
            if next.time > deadline { now = max(now, deadline); return false }
            now = max(now, next.time)
            while let due = timers.peek(), due.time <= next.time {
                _ = timers.pop()
                due.action()
            }
        }
    }

    /// The next ready job: the first in, under exploration a seeded pick.
    private func nextJob() -> UnownedJob? {
        guard explorer != nil else { return readyJobs.withLock { $0.pop() } }
        return readyJobs.withLock { jobs in jobs.pop(offset: jobs.count > 1 ? explorer!.pick(among: jobs.count) : 0) }
    }

    /// Calls `action` on the simulator thread at virtual time `time` (not before now).
    package func schedule(at time: UInt64, _ action: @escaping () -> Void) {
        timers.push(at: max(time, now), rank: 0, action)
    }

    /// Calls `action`, an event of `node` at a memory node's NIC, at virtual time `time`
    /// (not before now). Under exploration, such events due at the same time run highest
    /// priority first; otherwise this is `schedule(at:_:)`.
    package func schedule(at time: UInt64, rankedFor node: NodeID, _ action: @escaping () -> Void) {
        let rank = explorer?.rank(of: node) ?? 0
        timers.push(at: max(time, now), rank: rank, action)
    }

    /// Whether this run is scripted (`ScheduleExploration.scripted`).
    var isScripted: Bool { scripted != nil }

    /// In a scripted run, adds `connection` to the connections whose verbs are options
    /// (called once, when it first posts).
    func registerScripted(_ connection: SimulatedConnection) {
        scripted?.register(connection)
    }

    /// The choice points of a scripted run so far, in order (empty in other runs).
    package var choicePoints: [ChoicePoint] { scripted?.choicePoints ?? [] }

    /// The first number of the script that a scripted run could not follow (nil when it
    /// followed all of them, and in other runs).
    package var scriptMismatch: ScriptMismatch? { scripted?.mismatch }

    /// Draws from the run's seeded generator.
    package func random<T: FixedWidthInteger>(in range: ClosedRange<T>) -> T {
        T.random(in: range, using: &randomSource)
    }

    /// Derives a seed for an independent stream (a workload, a compute node's choices).
    package func forkSeed() -> UInt64 { randomSource.next() }

    // MARK: NIC timing (used by virtual-time connections)

    func jittered(_ nanos: UInt64) -> UInt64 {
        guard latency.jitterFraction > 0, nanos > 0 else { return nanos }
        let spread = UInt64(Double(nanos) * latency.jitterFraction)
        return nanos + (spread == 0 ? 0 : randomSource.next() % (spread + 1))
    }

    /// The extra delay of one network crossing of `node` under exploration (zero, with
    /// no draw, without it; see `ScheduleExploration`).
    func explorationDelay(of node: NodeID) -> UInt64 {
        explorer?.delay(of: node) ?? 0
    }

    /// Reserves the NIC's atomic unit of memory node `node` from `earliest`; returns the
    /// start time of the atomic.
    func reserveAtomicUnit(of node: NodeID, from earliest: UInt64, for service: UInt64) -> UInt64 {
        let start = max(earliest, atomicUnitFreeAt[node] ?? 0)
        atomicUnitFreeAt[node] = start + service
        return start
    }

    /// Records an executed verb in the trace and the node's verb count.
    func record(_ verb: Verb, by node: NodeID, result: Result<VerbResult, FabricError>) {
        totalVerbs += 1
        verbsExecuted[node, default: 0] += 1
        explorer?.verbExecuted(count: totalVerbs, by: node)
        traceHash.mix(now)
        traceHash.mix(UInt64(node.rawValue) << 8 | UInt64(verb.kind.rawValue))
        traceHash.mix(verb.address.rawValue)
        switch result {
        case .success(.read(let bytes)):
            for chunk in stride(from: 0, to: bytes.count, by: 8) {
                var word: UInt64 = 0
                for byte in chunk..<min(chunk + 8, bytes.count) { word |= UInt64(bytes[byte]) << (8 * UInt64(byte - chunk)) }
                traceHash.mix(word)
            }
        case .success(.written): traceHash.mix(1)
        case .success(.compareAndSwap(let exchanged, let original)): traceHash.mix(original &+ (exchanged ? 1 : 0))
        case .success(.fetchAndAdd(let original)): traceHash.mix(original)
        case .failure: traceHash.mix(0xDEAD)
        }
    }

    /// Verbs that `node` has had executed so far.
    package func verbsExecuted(by node: NodeID) -> UInt64 { verbsExecuted[node] ?? 0 }
}

/// A binary min-heap of timers ordered by (time, rank, insertion sequence): ties run by
/// rank (always 0 without schedule exploration), then in the order they were scheduled,
/// which keeps runs reproducible.
struct TimerHeap {
    struct Entry {
        let time: UInt64
        let rank: UInt64
        let sequence: UInt64
        let action: () -> Void
        func precedes(_ other: Entry) -> Bool {
            if time != other.time { return time < other.time }
            return rank != other.rank ? rank < other.rank : sequence < other.sequence
        }
    }

    private var entries: [Entry] = []
    private var nextSequence: UInt64 = 0

    var isEmpty: Bool { entries.isEmpty }
    func peek() -> Entry? { entries.first }

    mutating func push(at time: UInt64, rank: UInt64, _ action: @escaping () -> Void) {
        entries.append(Entry(time: time, rank: rank, sequence: nextSequence, action: action))
        nextSequence += 1
        var child = entries.count - 1
        while child > 0 {
            let parent = (child - 1) / 2
            guard entries[child].precedes(entries[parent]) else { break }
            entries.swapAt(child, parent)
            child = parent
        }
    }

    mutating func pop() -> Entry? {
        guard !entries.isEmpty else { return nil }
        entries.swapAt(0, entries.count - 1)
        let top = entries.removeLast()
        var parent = 0
        while true {
            let left = 2 * parent + 1
            let right = left + 1
            var first = parent
            if left < entries.count, entries[left].precedes(entries[first]) { first = left }
            if right < entries.count, entries[right].precedes(entries[first]) { first = right }
            guard first != parent else { break }
            entries.swapAt(parent, first)
            parent = first
        }
        return top
    }
}
