/// How a `Simulator` explores schedules beyond the ones its latency model gives.
///
/// With `.none` the order of events comes from the latency model and its seeded jitter
/// alone: two nodes whose operations start a microsecond apart almost always reach the
/// memory node in that order, so a race that needs the other order is almost never run.
/// `.randomPriorities` biases every run towards a random order of the nodes, after PCT
/// (Burckhardt et al., "A Randomized Scheduler with Probabilistic Guarantees of Finding
/// Bugs", ASPLOS 2010):
///
/// - every simulated node (the local node of a virtual-time connection; a memory node
///   too, should it post in virtual time) gets a random priority when it first shows up;
/// - verbs ready at a memory node's NIC at the same virtual time execute highest
///   priority first;
/// - every request and every completion of a node crosses the network later by an
///   amount that grows as its priority falls (from nothing for the highest to
///   `4 x oneWayNanos` for the lowest initial priority, up to twice that after a drop),
///   plus seeded noise of an eighth of that span, so lower-priority nodes fall behind
///   higher-priority ones;
/// - `changePoints` times, at verb counts drawn uniformly from the run's first
///   `horizonVerbs` verbs, the node whose verb has just executed drops below every other
///   priority (later drops lower still), as PCT's change points do;
/// - when several jobs are ready to run, a seeded pick chooses which runs next instead of
///   first in, first out.
///
/// This is PCT's idea, not its proof: the guarantee that a bug of depth d shows with
/// probability at least 1/(n k^(d-1)) per run holds for a scheduler that runs one thread
/// at a time strictly by priority; here the latency model still decides between events
/// far apart in time. What it does give: for two nodes, each order of their operations is
/// run in about half of the seeds, whatever their start times within the span above.
/// The same seed and the same mode give the same run, bit for bit.
///
/// `.scripted` takes the order away from time altogether, for exhaustive exploration of
/// tiny programs (see `ScriptedScheduler` for the exact rules): the simulator runs every
/// runnable task until each one waits (for a batch it posted or for a sleep); then the
/// verbs the NICs may execute next (the head of each connection's send queue, and the
/// first WRITE behind it when that WRITE may pass it) are the options, in a stable order,
/// and the next number of the script picks one (beyond the script's end: the first). A
/// step with one option is not a choice point. Sleepers wake only when no verb is left to
/// execute. The run records every choice point and how many options it had, so a driver
/// can enumerate every script (`ExhaustiveExploration` in the harness).
///
/// ```swift
/// let simulator = Simulator(seed: 7, latency: LatencyModel(), exploration: .randomPriorities(changePoints: 3))
/// let replayed = Simulator(seed: 1, latency: LatencyModel(), exploration: .scripted([1, 0, 1]))
/// ```
package enum ScheduleExploration: Sendable, Hashable, CustomStringConvertible {
    /// No exploration: the schedule the latency model and the seed give.
    case none
    /// PCT-style random node priorities with `changePoints` priority drops within the
    /// first `horizonVerbs` verbs of the run.
    case randomPriorities(changePoints: Int, horizonVerbs: UInt64 = 10_000)
    /// The order in which the NICs execute verbs of different connections comes from a
    /// choice sequence, not from time: at each choice point the next number of the script
    /// is the index of the option taken; past the script's end, option 0.
    case scripted([Int])

    package var description: String {
        switch self {
        case .none: "none"
        case .randomPriorities(let changePoints, let horizonVerbs):
            "random priorities, \(changePoints) change points in the first \(horizonVerbs) verbs"
        case .scripted(let script): "scripted, choices [\(script.map(String.init).joined(separator: ","))]"
        }
    }
}

/// The state of `ScheduleExploration.randomPriorities` in one run: node priorities, the
/// change points still to come, and a seeded generator of its own (so that the latency
/// model's stream stays as it is). Lives on the simulator's thread.
struct PriorityExplorer {
    /// Initial priorities are drawn from `[base, base + initialPriorityRange)`; dropped
    /// ones are below `base`.
    private static let initialPriorityRange: UInt64 = 1 << 40

    private var random: SeededRandom
    /// Each node's priority once drawn; 0 before (a priority is at least 1).
    private var priorities = NodeTable()
    /// Verb counts (1-based, ascending) at which the executing node's priority drops.
    private var changePoints: [UInt64]
    private var nextChangePoint = 0
    private let changePointCount: Int
    private let base: UInt64
    /// The delay of the lowest initial priority, in nanoseconds.
    private let spreadNanoseconds: UInt64

    init(seed: UInt64, changePoints: Int, horizonVerbs: UInt64, spreadNanoseconds: UInt64) {
        precondition(changePoints >= 0, "change points must not be negative: \(changePoints)")
        precondition(horizonVerbs >= 1 || changePoints == 0, "change points need a horizon of at least one verb")
        // A stream apart from the simulator's own (the constant only tells them apart).
        random = SeededRandom(seed: seed ^ 0x5043_5420_4558_504C)
        changePointCount = changePoints
        base = UInt64(changePoints) + 1
        self.spreadNanoseconds = spreadNanoseconds
        var points: [UInt64] = []
        for _ in 0..<changePoints { points.append(1 + random.next() % horizonVerbs) }
        self.changePoints = points.sorted()
    }

    /// The priority of `node`, drawn the first time it is asked for (higher runs first).
    mutating func priority(of node: NodeID) -> UInt64 {
        let known = priorities[node]
        if known != 0 { return known }
        let drawn = base + random.next() % Self.initialPriorityRange
        priorities[node] = drawn
        return drawn
    }

    /// The timer rank of an event of `node`: lower ranks run first at equal times.
    mutating func rank(of node: NodeID) -> UInt64 { UInt64.max - priority(of: node) }

    /// The extra crossing delay of `node`: grows as its priority falls, plus noise.
    mutating func delay(of node: NodeID) -> UInt64 {
        let priority = priority(of: node)
        let spread = Double(spreadNanoseconds)
        let lowness: Double = priority >= base
            ? 1 - Double(priority - base) / Double(Self.initialPriorityRange)
            : 1 + Double(base - priority) / Double(max(changePointCount, 1))
        return UInt64(lowness * spread) + random.next() % (spreadNanoseconds / 8 + 1)
    }

    /// Called after the run's `verbCount`-th verb, executed by `node`: at a change point,
    /// `node` drops below every other priority.
    mutating func verbExecuted(count verbCount: UInt64, by node: NodeID) {
        while nextChangePoint < changePoints.count, changePoints[nextChangePoint] <= verbCount {
            priorities[node] = UInt64(changePointCount - nextChangePoint)
            nextChangePoint += 1
        }
    }

    /// A seeded pick among `count` ready jobs.
    mutating func pick(among count: Int) -> Int { Int(random.next() % UInt64(count)) }
}
