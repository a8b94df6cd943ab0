/// One step of a scripted run (`ScheduleExploration.scripted`) at which the NICs had more
/// than one verb they could execute next: how many options there were and the index of
/// the one the run took.
package struct ChoicePoint: Sendable, Hashable, CustomStringConvertible {
    /// The number of options at this step (at least 2).
    package var alternatives: Int
    /// The index of the option taken, `0..<alternatives`.
    package var taken: Int

    package init(alternatives: Int, taken: Int) {
        self.alternatives = alternatives
        self.taken = taken
    }

    package var description: String { "\(taken)/\(alternatives)" }
}

/// A number of a script that the run could not follow: at choice point `position` the
/// script asked for option `asked`, but the step had only `alternatives` options (the
/// script was made for another program or another engine). The run took option 0.
package struct ScriptMismatch: Sendable, Hashable, CustomStringConvertible {
    package var position: Int
    package var asked: Int
    package var alternatives: Int

    package var description: String {
        "choice \(position) of the script asks for option \(asked), but the run offered \(alternatives)"
    }
}

/// The state of `ScheduleExploration.scripted` in one run: the script, the connections
/// that have posted in virtual time, and the choice points met so far. Lives on the
/// simulator's thread.
///
/// The rules of a scripted run (the simulator's `run()` applies them):
/// - **Tasks first.** Every runnable job runs (first in, first out) until every task waits,
///   for a batch it posted or for a sleep. A batch is answered the moment its last verb
///   executes (results in posting order, as a QP completes them), so the task that posted
///   it is runnable again before the next step.
/// - **Options.** Then, for each connection with posted verbs not yet executed, in the
///   order of (local node, memory node, first post), the options are its send queue's
///   head and, when `Simulator.reordersUnfencedWrites` is on and the head is a READ or an
///   atomic, the first WRITE queued behind it if that WRITE is unfenced (it may pass them,
///   as on a real QP; see `SimulatedConnection`). Everything posted has arrived: there is
///   no network delay, and a fenced verb at the head has nothing left to wait for, since
///   every earlier verb of its connection has executed and been answered.
/// - **Choice points.** With two or more options, the step is a choice point: the script's
///   next number is the index of the option to execute (beyond the script's end: 0), and
///   the step is recorded with its number of options. With one option the verb executes
///   and nothing is recorded.
/// - **Time.** Executing a verb takes no virtual time. Sleeping tasks wake only when no
///   verb is left to execute: then the clock moves to the earliest timer and every timer
///   due then fires together, before the next step. So between connections the order of
///   NIC executions comes only from the script; sleeps (backoff, waits for upkeep) still
///   end, after every verb that could execute instead, and sleeps of equal length begun
///   in the same phase end together, so the verbs of two nodes backing off in step race
///   again. The latency model plays no part, and the seed only in a crash's late verbs.
final class ScriptedScheduler {
    /// A connection that has posted, held weakly (it belongs to its compute node, which the
    /// run may drop), with its place in the stable order.
    private struct Registered {
        weak var connection: SimulatedConnection?
        let localNode: UInt16
        let memoryNode: UInt16
        let serial: Int

        func precedes(_ other: Registered) -> Bool {
            (localNode, memoryNode, serial) < (other.localNode, other.memoryNode, other.serial)
        }
    }

    private let script: [Int]
    private var registered: [Registered] = []
    /// The choice points met so far, in order.
    private(set) var choicePoints: [ChoicePoint] = []
    /// The first number of the script the run could not follow, if any.
    private(set) var mismatch: ScriptMismatch?

    init(script: [Int]) {
        self.script = script
    }

    /// Adds `connection` to the stable order when it posts for the first time.
    func register(_ connection: SimulatedConnection) {
        let entry = Registered(
            connection: connection, localNode: connection.localNode.rawValue, memoryNode: connection.remoteNode.rawValue,
            serial: registered.count)
        let index = registered.firstIndex { entry.precedes($0) } ?? registered.count
        registered.insert(entry, at: index)
    }

    /// The verb to execute next: a connection and the position of the verb in its send
    /// queue, picked by the script when there are several options; nil when no connection
    /// has a verb to execute.
    func nextVerb(reordering: Bool) -> (connection: SimulatedConnection, position: Int)? {
        var options: [(connection: SimulatedConnection, position: Int)] = []
        for entry in registered {
            guard let connection = entry.connection else { continue }
            for position in connection.scriptedPositions(reordering: reordering) { options.append((connection, position)) }
        }
        switch options.count {
        case 0: return nil
        case 1: return options[0]
        default: return options[choose(among: options.count)]
        }
    }

    /// Takes the script's next number as the option of a choice point with `count`
    /// options (0 beyond the script's end) and records the choice point.
    private func choose(among count: Int) -> Int {
        let position = choicePoints.count
        var taken = 0
        if position < script.count {
            taken = script[position]
            if !(0..<count).contains(taken) {
                if mismatch == nil { mismatch = ScriptMismatch(position: position, asked: taken, alternatives: count) }
                taken = 0
            }
        }
        choicePoints.append(ChoicePoint(alternatives: count, taken: taken))
        return taken
    }
}
