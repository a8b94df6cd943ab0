import FineMem

/// What one scripted run gave: its choice points (how many options each had and which was
/// taken), its trace, its violations and a short summary of its answers.
package struct ScriptedRun: Sendable {
    /// The choice points of the run, in order.
    package var choicePoints: [ChoicePoint]
    /// The simulator's trace hash after the run.
    package var traceHash: TraceHash
    /// Verbs the NICs executed.
    package var verbs: UInt64
    /// Broken invariants and wrong answers; empty when the run was right.
    package var violations: [String]
    /// What the program's operations answered, in a few words (runs with the same
    /// outcome are counted together in a report).
    package var outcome: String

    package init(choicePoints: [ChoicePoint], traceHash: TraceHash, verbs: UInt64, violations: [String], outcome: String) {
        self.choicePoints = choicePoints
        self.traceHash = traceHash
        self.verbs = verbs
        self.violations = violations
        self.outcome = outcome
    }

    /// The record of `simulator`'s run so far, with `violations` and `outcome`; a script
    /// number the run could not follow is one more violation.
    package init(simulator: Simulator, violations: [String], outcome: String) {
        let mismatch = simulator.scriptMismatch.map { ["the script does not fit the run: \($0)"] } ?? []
        self.init(
            choicePoints: simulator.choicePoints, traceHash: simulator.traceHash, verbs: simulator.totalVerbs,
            violations: mismatch + violations, outcome: outcome)
    }

    /// The shortest script that replays this run: the choices taken, without the trailing
    /// zeros (a scripted run takes option 0 beyond its script).
    package var script: [Int] {
        var choices = choicePoints.map(\.taken)
        while choices.last == 0 { choices.removeLast() }
        return choices
    }
}

/// Exhaustive interleaving exploration of tiny programs: every order in which the memory
/// node's NIC can execute the verbs of different connections, enumerated by depth-first
/// search over the choice sequences of scripted runs (`ScheduleExploration.scripted`;
/// `ScriptedScheduler` has the exact rules).
///
/// The first run follows the empty script (option 0 at every choice point) and records
/// its choice points with their number of options. The next script is the recorded
/// choices up to the deepest choice point with an option left, that choice plus one; runs
/// follow their script and take option 0 beyond it. The search ends when every option of
/// every choice point has been taken, or after `runsMax` runs. Every run is one complete
/// interleaving: the count is the number of leaves of the choice tree. Each rerun of a
/// prefix is checked to offer the same options as before (the engine is deterministic),
/// and every violation comes with the script that reproduces it (`run(_:script:)`,
/// `finemem explore --exhaustive --program NAME --replay SCRIPT`).
///
/// ```swift
/// let report = ExhaustiveExploration().explore(.smallPairOneSpan)
/// print(report)   // interleavings, choice points, violations with their scripts
/// ```
package struct ExhaustiveExploration: Sendable {
    /// Bounds and switches of an exploration.
    package struct Configuration: Sendable, Hashable {
        /// The most runs (interleavings) per program; the report says when it was reached.
        package var runsMax = 1_000_000
        /// The most verbs one run may execute (a run that does not end is a violation).
        package var verbsPerRunMax: UInt64 = 100_000
        /// Whether a WRITE that may pass earlier READs and atomics of its connection is an
        /// option of a choice point (as on a real QP); off keeps every connection in
        /// posting order.
        package var reordersUnfencedWrites = true
        /// Violations kept in a report (the count covers all of them).
        package var violationsKept = 20
        /// The simulator's seed (only a crash's late verbs would draw from it).
        package var seed: UInt64 = 1

        package init() {}
    }

    /// One violating run: its replay script, what went wrong and its trace.
    package struct Violation: Sendable, CustomStringConvertible {
        package var script: [Int]
        package var messages: [String]
        package var traceHash: TraceHash

        /// The script as `--replay` takes it.
        package var scriptText: String { script.map(String.init).joined(separator: ",") }

        package var description: String {
            "script [\(scriptText)] (trace \(traceHash)): " + messages.joined(separator: "; ")
        }
    }

    /// The result of exploring one program.
    package struct Report: Sendable, CustomStringConvertible {
        package var name: String
        /// Complete runs, one per interleaving.
        package var interleavings = 0
        /// Choice points of the choice tree (each counted once, however many runs pass it).
        package var choicePoints = 0
        /// The most choice points on one run.
        package var deepestRun = 0
        /// The most options at one choice point.
        package var mostAlternatives = 0
        /// The fewest and most verbs of a run.
        package var verbsPerRun: ClosedRange<UInt64>?
        /// Whether every choice sequence was explored.
        package var complete = false
        /// Whether the search stopped at `Configuration.runsMax`.
        package var runsMaxReached = false
        /// Why the search stopped early otherwise (the engine was not deterministic).
        package var aborted: String?
        /// Runs with at least one violation.
        package var violatingRuns = 0
        /// The first violations (up to `Configuration.violationsKept`).
        package var violations: [Violation] = []
        /// How many runs ended with each outcome.
        package var outcomes: [String: Int] = [:]
        /// Wall-clock time of the search.
        package var wallNanoseconds: UInt64 = 0
        /// The trace hashes of every run, folded in the order of the search: equal when
        /// two builds run the same simulations.
        package var traces = TraceHash()

        package init(name: String) { self.name = name }

        package var description: String {
            let state = complete ? "complete" : runsMaxReached ? "stopped at the run bound" : "aborted: \(aborted ?? "?")"
            let verbs = verbsPerRun.map { " verbs per run \($0.lowerBound)-\($0.upperBound)," } ?? ""
            return "\(name): \(interleavings) interleavings (\(state)), \(choicePoints) choice points, deepest run \(deepestRun) choices,"
                + "\(verbs) \(outcomes.count) outcomes, \(violatingRuns) violating runs"
        }
    }

    package let configuration: Configuration

    package init(_ configuration: Configuration = Configuration()) { self.configuration = configuration }

    // MARK: Enumerating choice sequences

    /// Runs `run` under every choice sequence, depth first (see the type's summary), up to
    /// `runsMax` runs; answers the report named `name`. `run` must build a scripted
    /// simulator from the script it is given and answer what the run gave.
    package static func enumerate(
        _ name: String, runsMax: Int, violationsKept: Int = 20, _ run: (_ script: [Int]) -> ScriptedRun
    ) -> Report {
        var report = Report(name: name)
        let clock = SystemRuntime.shared
        let start = clock.nowNanoseconds
        var script: [Int] = []
        /// The choice points of the path the next run replays (its last one advanced).
        var path: [ChoicePoint] = []
        while true {
            guard report.interleavings < runsMax else {
                report.runsMaxReached = true
                break
            }
            let record = run(script)
            report.interleavings += 1
            if let divergence = divergence(of: record.choicePoints, from: path, script: script) {
                report.aborted = "script [\(script.map(String.init).joined(separator: ","))]: \(divergence)"
                break
            }
            report.choicePoints += record.choicePoints.count - script.count
            report.deepestRun = max(report.deepestRun, record.choicePoints.count)
            report.mostAlternatives = max(report.mostAlternatives, record.choicePoints.map(\.alternatives).max() ?? 0)
            report.verbsPerRun = report.verbsPerRun.map { min($0.lowerBound, record.verbs)...max($0.upperBound, record.verbs) }
                ?? record.verbs...record.verbs
            report.outcomes[record.outcome, default: 0] += 1
            report.traces.mix(record.traceHash.value)
            if !record.violations.isEmpty {
                report.violatingRuns += 1
                if report.violations.count < violationsKept {
                    report.violations.append(Violation(script: record.script, messages: record.violations, traceHash: record.traceHash))
                }
            }
            path = record.choicePoints
            while let last = path.last, last.taken + 1 >= last.alternatives { path.removeLast() }
            guard !path.isEmpty else {
                report.complete = true
                break
            }
            path[path.count - 1].taken += 1
            script = path.map(\.taken)
        }
        report.wallNanoseconds = clock.nowNanoseconds - start
        return report
    }

    /// How a run of `script` strayed from the path it was to replay: another number of
    /// options at a choice point of the prefix, or fewer choice points than the script;
    /// nil when it followed the path.
    private static func divergence(of choicePoints: [ChoicePoint], from path: [ChoicePoint], script: [Int]) -> String? {
        for (index, taken) in script.enumerated() {
            guard index < choicePoints.count else {
                return "the run met \(choicePoints.count) choice points, the same prefix met \(script.count) before"
            }
            guard choicePoints[index].alternatives == path[index].alternatives, choicePoints[index].taken == taken else {
                return "choice point \(index) offered \(choicePoints[index]), the same prefix offered \(path[index].alternatives) options before"
            }
        }
        return nil
    }

    // MARK: Programs

    /// Explores every interleaving of `program` (up to the run bound).
    package func explore(_ program: ExhaustiveProgram) -> Report {
        Self.enumerate(program.name, runsMax: configuration.runsMax, violationsKept: configuration.violationsKept) { script in
            run(program, script: script)
        }
    }

    /// Runs `program` once under `script` (a replay) and checks it.
    package func run(_ program: ExhaustiveProgram, script: [Int]) -> ScriptedRun {
        let simulator = Simulator(seed: configuration.seed, latency: LatencyModel(), exploration: .scripted(script))
        simulator.reordersUnfencedWrites = configuration.reordersUnfencedWrites
        simulator.scriptedVerbsMax = configuration.verbsPerRunMax
        let state = Locked(ProgramState(computeNodes: program.concurrent.count))
        simulator.spawn { await Self.drive(program, simulator: simulator, state: state) }
        let ranOut = simulator.run()
        return state.withLock { state in
            var violations = state.violations
            if !ranOut {
                violations.append("the run did not end within \(configuration.verbsPerRunMax) verbs")
            } else if !state.finished {
                violations.append("the program never finished: a task waits for an answer that never comes")
            }
            return ScriptedRun(simulator: simulator, violations: violations, outcome: state.outcome)
        }
    }

    /// What the tasks of one run share: the blocks by handle, the answers, the violations.
    private struct ProgramState: Sendable {
        /// Each compute node's blocks by handle (nil: that allocation failed).
        var handles: [[Block?]]
        /// Each compute node's answers in the concurrent part, in a few words.
        var answers: [[String]]
        var violations: [String] = []
        /// Sizes (log2 of chunks) answered `outOfMemory` in the concurrent part.
        var outOfMemorySizes: Set<Int> = []
        var finished = false

        init(computeNodes: Int) {
            handles = Array(repeating: [], count: computeNodes)
            answers = Array(repeating: [], count: computeNodes)
        }

        var outcome: String {
            answers.enumerated().map { node, answers in "node \(node): " + answers.joined(separator: ", ") }.joined(separator: " | ")
        }
    }

    /// The body of one run (see `ExhaustiveProgram`).
    private static func drive(_ program: ExhaustiveProgram, simulator: Simulator, state: Locked<ProgramState>) async {
        let cluster: EmbeddedCluster
        // Upkeep workers end as soon as the queue is empty: a lingering worker sleeps, and
        // in a scripted run sleepers wake only when no verb is left, which would put every
        // later flush after the racing operations instead of among them.
        var allocator = AllocatorConfiguration()
        allocator.upkeepIdleRounds = 0
        do {
            cluster = try await EmbeddedCluster.start(
                .init(memoryNodes: 1, poolBytesPerNode: program.poolBytes, computeNodes: program.concurrent.count, allocator: allocator),
                simulator: simulator)
        } catch {
            state.withLock { $0.violations.append("the cluster did not start: \(error)") }
            return
        }
        let inspector = PoolInspector(cluster: cluster)
        for step in program.setup {
            await perform(
                step.operation, node: step.computeNode, cluster: cluster, inspector: inspector, state: state, concurrent: false,
                mayRunOutOfMemory: false)
            await cluster.quiesce()
        }
        await withTaskGroup(of: Void.self) { group in
            for (node, operations) in program.concurrent.enumerated() {
                group.addTask {
                    for operation in operations {
                        await perform(
                            operation, node: node, cluster: cluster, inspector: inspector, state: state, concurrent: true,
                            mayRunOutOfMemory: program.mayRunOutOfMemory)
                    }
                }
            }
        }
        await cluster.quiesce()
        let freesNothing = !program.concurrent.joined().contains { if case .free = $0 { true } else { false } }
        state.withLock { state in
            state.violations += (inspector.checkAtRest() + inspector.checkRoomSummary()).map { "after the concurrent part: \($0)" }
            if freesNothing {
                for size in state.outOfMemorySizes.sorted() where inspector.freeRunExists(chunkCountLog2: size) {
                    state.violations.append("out of memory for \(ExhaustiveProgram.bytesText(chunkCountLog2: size)), but the pool has such a run at rest")
                }
            }
        }
        for node in program.concurrent.indices {
            let blocks = cluster.computeNodes[node]
            let held = state.withLock { $0.handles[node].compactMap { $0 } }
            for block in held {
                let released = inspector.release(block)
                do throws(AllocationError) { try await blocks.free(block, application: application) } catch {
                    state.withLock { $0.violations.append("node \(node): the final free of \(block) failed: \(error)") }
                }
                state.withLock { $0.violations += released }
                // One free and its upkeep at a time: the final frees add no choice point.
                await cluster.quiesce()
            }
        }
        let problems = inspector.checkAtRest() + inspector.checkRoomSummary() + inspector.everyHeaderEmpty()
        state.withLock { state in
            state.violations += problems.map { "after the final frees: \($0)" }
            state.finished = true
        }
    }

    /// The application every operation runs for.
    private static let application = ApplicationID(1)

    /// Performs `operation` of compute node `node`, records its answer and checks the
    /// pool's structure after it. `outOfMemory` is a right answer only in the concurrent
    /// part of a program that allows it (`mayRunOutOfMemory`).
    private static func perform(
        _ operation: ExhaustiveProgram.Operation, node: Int, cluster: EmbeddedCluster, inspector: PoolInspector,
        state: Locked<ProgramState>, concurrent: Bool, mayRunOutOfMemory: Bool
    ) async {
        let blocks = cluster.computeNodes[node]
        func note(_ answer: String, _ problems: [String]) {
            state.withLock { state in
                if concurrent { state.answers[node].append(answer) }
                state.violations += problems.map { "node \(node) \(operation): \($0)" }
            }
        }
        switch operation {
        case .allocate(let chunkCountLog2):
            do throws(AllocationError) {
                let block = try await blocks.allocate(chunkCountLog2: chunkCountLog2, application: application)
                state.withLock { $0.handles[node].append(block) }
                note("chunk \(block.firstChunk)+2^\(block.chunkCountLog2)", inspector.admit(block, owner: blocks.owner) + inspector.checkStructure())
            } catch {
                state.withLock { $0.handles[node].append(nil) }
                if case .outOfMemory = error {
                    if concurrent { state.withLock { _ = $0.outOfMemorySizes.insert(chunkCountLog2) } }
                    note("out of memory", concurrent && mayRunOutOfMemory ? [] : ["answered out of memory"])
                } else {
                    note("\(error)", ["answered \(error)"])
                }
            }
        case .free(let handle):
            let held = state.withLock { state -> Block?? in
                state.handles[node].indices.contains(handle) ? .some(state.handles[node][handle]) : nil
            }
            guard let held else {
                note("no handle", ["node \(node) has no handle \(handle)"])
                return
            }
            guard let block = held else {
                note("nothing to free", [])
                return
            }
            let released = inspector.release(block)
            do throws(AllocationError) {
                try await blocks.free(block, application: application)
                state.withLock { $0.handles[node][handle] = nil }
                note("freed", released + inspector.checkStructure())
            } catch {
                note("\(error)", released + ["answered \(error)"])
            }
        case .refreshCache:
            var trace = OperationTrace()
            do throws(AllocationError) {
                for link in blocks.links { try await blocks.refresh(link, trace: &trace) }
                note("refreshed", [])
            } catch {
                note("\(error)", ["answered \(error)"])
            }
        }
    }
}
