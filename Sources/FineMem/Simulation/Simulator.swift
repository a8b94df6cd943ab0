#if canImport(Glibc)
import Glibc
#elseif canImport(Darwin)
import Darwin
#endif
import Atomics

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
public final class Simulator: TaskExecutor, Runtime, @unchecked Sendable {
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

    /// The state that every job, timer and verb touches, behind a pointer: only the
    /// thread in `run()` (or, before any run, the thread setting the simulation up) uses
    /// it, and a pointer's pointee carries no dynamic exclusivity check (a class's stored
    /// properties cost two runtime calls and a thread-local lookup per access).
    private let core: UnsafeMutablePointer<Core>
    /// Jobs enqueued by a thread other than the one in `run()`: the first task of a run
    /// (`spawn` before `run()`), or a task resumed from outside. The running thread moves
    /// them to the ready queue, in order, when `inboxCount` says there are some.
    private let inbox = Locked<[UnownedJob]>([])
    private let inboxCount = UnsafeAtomic<Int>.create(0)
    /// The thread in `run()` (0 when none is): its enqueues take no lock.
    private let runningThread = UnsafeAtomic<UInt>.create(0)
    private var scripted: ScriptedScheduler?

    private struct Core {
        var readyJobs = JobQueue()
        var timers = TimerHeap()
        var now: UInt64 = 0
        var randomSource: SeededRandom
        /// When the atomic unit of each memory node is free again, by node.
        var atomicUnitFreeAt = NodeTable()
        var verbsExecuted = NodeTable()
        var traceHash = TraceHash()
        var totalVerbs: UInt64 = 0
        var explorer: PriorityExplorer?
        var changeObserver: ((Verb, NodeID) -> Void)?
    }

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

    /// The run's trace so far: every verb a simulated NIC executed (time, node, kind,
    /// address, answer), folded in order.
    public var traceHash: TraceHash { core.pointee.traceHash }
    /// Verbs executed by all simulated NICs in this run.
    package var totalVerbs: UInt64 { core.pointee.totalVerbs }

    /// A simulator whose run is determined by `seed`, with the default latency model.
    public convenience init(seed: UInt64) {
        self.init(seed: seed, latency: LatencyModel())
    }

    /// A simulator whose run is determined by `seed` and `exploration`, with `latency`.
    package init(seed: UInt64, latency: LatencyModel, exploration: ScheduleExploration = .none) {
        self.seed = seed
        self.latency = latency
        self.exploration = exploration
        core = .allocate(capacity: 1)
        core.initialize(to: Core(randomSource: SeededRandom(seed: seed)))
        switch exploration {
        case .none: break
        case .randomPriorities(let changePoints, let horizonVerbs):
            core.pointee.explorer = PriorityExplorer(
                seed: seed, changePoints: changePoints, horizonVerbs: horizonVerbs, spreadNanoseconds: 4 * latency.oneWayNanos)
        case .scripted(let script):
            scripted = ScriptedScheduler(script: script)
        }
    }

    deinit {
        core.deinitialize(count: 1)
        core.deallocate()
        inboxCount.destroy()
        runningThread.destroy()
    }

    // MARK: Executor

    public func enqueue(_ job: consuming ExecutorJob) {
        let unowned = UnownedJob(job)
        if runningThread.load(ordering: .relaxed) == Self.currentThread() {
            core.pointee.readyJobs.push(unowned)
            return
        }
        inbox.withLock { jobs in
            jobs.append(unowned)
            inboxCount.wrappingIncrement(ordering: .releasing)
        }
    }

    /// The calling thread, as a number that no other live thread has.
    @inline(__always)
    private static func currentThread() -> UInt {
        #if canImport(Glibc)
        UInt(pthread_self())
        #else
        UInt(bitPattern: pthread_self())
        #endif
    }

    /// Moves the jobs other threads enqueued to the ready queue, in their order.
    private func takeInbox() {
        inbox.withLock { jobs in
            for job in jobs { core.pointee.readyJobs.push(job) }
            inboxCount.wrappingDecrement(by: jobs.count, ordering: .relaxed)
            jobs.removeAll(keepingCapacity: true)
        }
    }

    // MARK: Runtime

    public func spawn(_ body: @escaping @Sendable () async -> Void) {
        Task(executorPreference: self) { await body() }
    }

    public func sleep(nanoseconds: UInt64) async {
        await withUnsafeContinuation { (continuation: UnsafeContinuation<Void, Never>) in
            let core = core
            core.pointee.timers.push(at: core.pointee.now + nanoseconds, rank: 0, .resume(continuation))
        }
    }

    public var nowNanoseconds: UInt64 { core.pointee.now }

    /// One task runs at a time in virtual time.
    package var parallelism: Int { 1 }

    // MARK: Driving

    /// Runs until no job and no timer is left, or until the clock would pass `deadline`.
    /// Returns whether the simulation ran out of work (as opposed to reaching the deadline,
    /// or, in a scripted run, `scriptedVerbsMax`).
    @discardableResult
    public func run(untilNanoseconds deadline: UInt64 = .max) -> Bool {
        let thread = Self.currentThread()
        let previous = runningThread.exchange(thread, ordering: .acquiring)
        precondition(previous == 0 || previous == thread, "a simulator runs on one thread at a time")
        defer { if previous == 0 { runningThread.store(0, ordering: .releasing) } }
        if let scripted { return runScripted(scripted, untilNanoseconds: deadline) }
        let core = core
        while true {
            runReadyJobs()
            guard let next = core.pointee.timers.peek() else { return true }
            if next.time > deadline { core.pointee.now = deadline; return false }
            core.pointee.now = next.time
            fire(core.pointee.timers.pop())
        }
    }

    /// Runs every ready job, and every job they make ready, until none is left.
    private func runReadyJobs() {

        let taskExecutor = asUnownedTaskExecutor()
        while let job = nextJob() {
            job.runSynchronously(on: taskExecutor)
        }
    }

    /// `run(untilNanoseconds:)` of a scripted run (see `ScriptedScheduler`): tasks until
    /// every one waits, then one verb (the script picks among several), and only when no
    /// verb is left, the timers due first, all together.
    private func runScripted(_ scripted: ScriptedScheduler, untilNanoseconds deadline: UInt64) -> Bool {
        let core = core
        while true {
            runReadyJobs()
            if let (connection, position) = scripted.nextVerb(reordering: reordersUnfencedWrites) {
                guard core.pointee.totalVerbs < scriptedVerbsMax else { return false }
                connection.executeScripted(at: position, simulator: self)
                continue
            }
            guard let next = core.pointee.timers.peek() else { return true }
            if next.time > deadline { core.pointee.now = max(core.pointee.now, deadline); return false }
            core.pointee.now = max(core.pointee.now, next.time)
            while let due = core.pointee.timers.peek(), due.time <= next.time {
                fire(core.pointee.timers.pop())
            }
        }
    }

    /// The next ready job: the first in, under exploration a seeded pick.
    @inline(__always)
    private func nextJob() -> UnownedJob? {
        if inboxCount.load(ordering: .acquiring) > 0 { takeInbox() }
        let core = core
        guard core.pointee.explorer != nil else { return core.pointee.readyJobs.pop() }
        let count = core.pointee.readyJobs.count
        return core.pointee.readyJobs.pop(offset: count > 1 ? core.pointee.explorer!.pick(among: count) : 0)
    }

    /// Runs a timer that is due.
    private func fire(_ event: TimerEvent) {
        switch event {
        case .resume(let continuation): continuation.resume()
        case .pump(let connection): connection.pump(simulator: self)
        case .deliver(let connection, let delivery): connection.deliver(delivery, simulator: self)
        case .action(let action): action()
        }
    }

    /// Calls `action` on the simulator thread at virtual time `time` (not before now).
    package func schedule(at time: UInt64, _ action: @escaping () -> Void) {
        schedule(at: time, .action(action))
    }

    /// Runs `event` on the simulator thread at virtual time `time` (not before now).
    func schedule(at time: UInt64, _ event: TimerEvent) {
        let core = core
        core.pointee.timers.push(at: max(time, core.pointee.now), rank: 0, event)
    }

    /// Runs `event`, an event of `node` at a memory node's NIC, at virtual time `time`
    /// (not before now). Under exploration, such events due at the same time run highest
    /// priority first; otherwise this is `schedule(at:_:)`.
    func schedule(at time: UInt64, rankedFor node: NodeID, _ event: TimerEvent) {
        let core = core
        let rank = core.pointee.explorer?.rank(of: node) ?? 0
        core.pointee.timers.push(at: max(time, core.pointee.now), rank: rank, event)
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
        T.random(in: range, using: &core.pointee.randomSource)
    }

    /// Derives a seed for an independent stream (a workload, a compute node's choices).
    package func forkSeed() -> UInt64 { core.pointee.randomSource.next() }

    // MARK: NIC timing (used by virtual-time connections)

    func jittered(_ nanos: UInt64) -> UInt64 {
        guard latency.jitterFraction > 0, nanos > 0 else { return nanos }
        let spread = UInt64(Double(nanos) * latency.jitterFraction)
        return nanos + (spread == 0 ? 0 : core.pointee.randomSource.next() % (spread + 1))
    }

    /// The extra delay of one network crossing of `node` under exploration (zero, with
    /// no draw, without it; see `ScheduleExploration`).
    func explorationDelay(of node: NodeID) -> UInt64 {
        core.pointee.explorer?.delay(of: node) ?? 0
    }

    /// Reserves the NIC's atomic unit of memory node `node` from `earliest`; returns the
    /// start time of the atomic.
    func reserveAtomicUnit(of node: NodeID, from earliest: UInt64, for service: UInt64) -> UInt64 {
        let core = core
        let start = max(earliest, core.pointee.atomicUnitFreeAt[node])
        core.pointee.atomicUnitFreeAt[node] = start + service
        return start
    }

    /// Counts an executed verb of `node` and folds it into the trace: the time, the node
    /// and kind, the address, then `answer`'s words.
    @inline(__always)
    private func record(_ verb: Verb, by node: NodeID, answer: (inout TraceHash) -> Void) {
        let core = core
        core.pointee.totalVerbs += 1
        core.pointee.verbsExecuted[node] += 1
        core.pointee.explorer?.verbExecuted(count: core.pointee.totalVerbs, by: node)
        core.pointee.traceHash.mix(core.pointee.now)
        core.pointee.traceHash.mix(UInt64(node.rawValue) << 8 | UInt64(verb.kind.rawValue))
        core.pointee.traceHash.mix(verb.address.rawValue)
        answer(&core.pointee.traceHash)
    }

    /// Records an executed verb in the trace and the node's verb count.
    func record(_ verb: Verb, by node: NodeID, result: Result<VerbResult, FabricError>) {
        record(verb, by: node) { trace in
            switch result {
            case .success(.read(let bytes)):
                for chunk in stride(from: 0, to: bytes.count, by: 8) {
                    var word: UInt64 = 0
                    for byte in chunk..<min(chunk + 8, bytes.count) { word |= UInt64(bytes[byte]) << (8 * UInt64(byte - chunk)) }
                    trace.mix(word)
                }
            case .success(.written): trace.mix(1)
            case .success(.compareAndSwap(let exchanged, let original)): trace.mix(original &+ (exchanged ? 1 : 0))
            case .success(.fetchAndAdd(let original)): trace.mix(original)
            case .failure: trace.mix(0xDEAD)
            }
        }
    }

    /// Records an executed 8-byte verb (a one-word READ, a compare-and-swap or a
    /// fetch-and-add) that answered `word` (the word read, or the original value), as
    /// `record(_:by:result:)` records the same verb's general result.
    func record(_ verb: Verb, by node: NodeID, word: UInt64) {
        record(verb, by: node) { trace in
            if case .compareAndSwap(_, let expected, _, _, _) = verb {
                trace.mix(word &+ (word == expected ? 1 : 0))
            } else {
                trace.mix(word)
            }
        }
    }

    /// Verbs that `node` has had executed so far.
    package func verbsExecuted(by node: NodeID) -> UInt64 { core.pointee.verbsExecuted[node] }

    /// Calls `observer` on the simulator's thread right after each verb of a virtual-time
    /// connection that changed the memory of a simulated NIC (a WRITE, a fetch-and-add, a
    /// compare-and-swap that exchanged), with the verb and the memory node, before
    /// anything else happens in the run: what a checker needs to look at the pool at every
    /// instant it changes (`OutOfMemoryOracle`). Verbs of immediate-mode connections (a
    /// memory node's loopback) are not seen. One observer per run; set it before the run
    /// starts, or from a task of the run. It draws nothing from the run's random stream, so
    /// the run is the same with it as without.
    package func observeChanges(_ observer: @escaping (Verb, NodeID) -> Void) {
        core.pointee.changeObserver = observer
    }

    /// A verb of a virtual-time connection executed on memory node `memoryNode`'s NIC;
    /// `changed`: whether it changed memory.
    @inline(__always)
    func executed(_ verb: Verb, on memoryNode: NodeID, changed: Bool) {
        guard changed, let observer = core.pointee.changeObserver else { return }
        observer(verb, memoryNode)
    }
}

/// A counter per simulated node, indexed by the node's number (no hashing: memory nodes
/// are 0, 1, ... and compute nodes 1001, 1002, ...; the table grows to the largest node
/// seen). Absent nodes count zero.
struct NodeTable {
    private var values: [UInt64] = []

    subscript(node: NodeID) -> UInt64 {
        get {
            let index = Int(node.rawValue)
            return index < values.count ? values[index] : 0
        }
        set {
            let index = Int(node.rawValue)
            if index >= values.count { values += repeatElement(0, count: index + 1 - values.count) }
            values[index] = newValue
        }
    }
}

/// What a timer does when it is due: resume a sleeping task, let a connection's NIC take
/// its next verb, hand a connection's finished batch to its waiter, or anything else.
enum TimerEvent {
    case resume(UnsafeContinuation<Void, Never>)
    case pump(SimulatedConnection)
    case deliver(SimulatedConnection, SimulatedConnection.Delivery)
    case action(() -> Void)
}

/// A binary min-heap of timers ordered by (time, rank, insertion sequence): ties run by
/// rank (always 0 without schedule exploration), then in the order they were scheduled,
/// which keeps runs reproducible. The heap moves plain keys; each key names the slot of
/// its event, and slots are reused (no allocation per timer once the heap has grown).
struct TimerHeap {
    struct Key {
        let time: UInt64
        let rank: UInt64
        let sequence: UInt64
        let slot: Int

        @inline(__always)
        func precedes(_ other: Key) -> Bool {
            if time != other.time { return time < other.time }
            return rank != other.rank ? rank < other.rank : sequence < other.sequence
        }
    }

    private var keys: [Key] = []
    private var events: [TimerEvent?] = []
    private var freeSlots: [Int] = []
    private var nextSequence: UInt64 = 0

    var isEmpty: Bool { keys.isEmpty }
    func peek() -> Key? { keys.first }

    mutating func push(at time: UInt64, rank: UInt64, _ event: TimerEvent) {
        let slot: Int
        if let free = freeSlots.popLast() {
            slot = free
            events[slot] = event
        } else {
            slot = events.count
            events.append(event)
        }
        keys.append(Key(time: time, rank: rank, sequence: nextSequence, slot: slot))
        nextSequence += 1
        var child = keys.count - 1
        let key = keys[child]
        while child > 0 {
            let parent = (child - 1) / 2
            guard key.precedes(keys[parent]) else { break }
            keys[child] = keys[parent]
            child = parent
        }
        keys[child] = key
    }

    /// Removes the first timer (the heap must not be empty) and answers its event.
    mutating func pop() -> TimerEvent {
        let top = keys[0]
        let last = keys.removeLast()
        if !keys.isEmpty {
            var parent = 0
            let count = keys.count
            while true {
                let left = 2 * parent + 1
                guard left < count else { break }
                let right = left + 1
                let child = right < count && keys[right].precedes(keys[left]) ? right : left
                guard keys[child].precedes(last) else { break }
                keys[parent] = keys[child]
                parent = child
            }
            keys[parent] = last
        }
        let event = events[top.slot].take()!
        freeSlots.append(top.slot)
        return event
    }
}
