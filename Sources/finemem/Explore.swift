import ArgumentParser
import FineMem
import FineMemHarness

struct Explore: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Explore the schedules of tiny programs: --exhaustive enumerates every interleaving of verbs.",
        discussion: """
            Each program runs two compute nodes on one memory node of a tiny pool, each with \
            a fixed list of two or three operations at the same time. In exhaustive mode the \
            order in which the memory node's NIC executes the verbs of different connections \
            comes from a choice sequence, not from the clock, and every choice sequence is \
            run (depth first), with the pool's invariants checked after each run. Printed \
            per program: interleavings (complete runs), choice points of the choice tree, \
            wall time, and each violation with the script that replays it \
            (`--program NAME --replay SCRIPT`). Without `--program`, every named program \
            runs; `--list` names them. Build in release for speed: \
            swift run -c release finemem explore --exhaustive
            """
    )

    @Flag(help: "Enumerate every interleaving of verbs between the compute nodes (the only mode so far).") var exhaustive = false
    @Option(help: "The program to explore (default: all of them; see --list).") var program: String?
    @Flag(help: "List the named programs and exit.") var list = false
    @Option(help: "The most runs (interleavings) per program.") var runsMax = 1_000_000
    @Option(help: "The most verbs of one run.") var verbsPerRunMax: UInt64 = 100_000
    @Flag(inversion: .prefixedNo, help: "Let unfenced WRITEs pass earlier READs and atomics (one more option at a choice point).")
    var writeReordering = true
    @Option(help: "Replay one run of --program: its script, comma-separated choices (empty: all zeros).") var replay: String?

    func validate() throws {
        guard list || exhaustive else { throw ValidationError("give --exhaustive (or --list)") }
        guard runsMax >= 1, verbsPerRunMax >= 1 else { throw ValidationError("bounds must be positive") }
        if let program, ExhaustiveProgram.named(program) == nil {
            throw ValidationError("no program \(program); the programs are: \(ExhaustiveProgram.catalog.map(\.name).joined(separator: ", "))")
        }
        if let replay {
            guard program != nil else { throw ValidationError("--replay needs --program") }
            guard parseScript(replay) != nil else { throw ValidationError("--replay takes comma-separated choices such as 0,1,0") }
        }
    }

    func run() throws {
        if list {
            for program in ExhaustiveProgram.catalog { print(program) }
            return
        }
        var configuration = ExhaustiveExploration.Configuration()
        configuration.runsMax = runsMax
        configuration.verbsPerRunMax = verbsPerRunMax
        configuration.reordersUnfencedWrites = writeReordering
        let exploration = ExhaustiveExploration(configuration)
        if let replay, let name = program, let program = ExhaustiveProgram.named(name), let script = parseScript(replay) {
            let run = exploration.run(program, script: script)
            print(program)
            print("script [\(script.map(String.init).joined(separator: ","))]: choice points \(run.choicePoints.map(\.description).joined(separator: " "))")
            print("verbs \(run.verbs), trace \(run.traceHash)")
            print("outcome: \(run.outcome)")
            for violation in run.violations { print("  VIOLATION \(violation)") }
            if !run.violations.isEmpty { throw ExitCode.failure }
            return
        }
        let programs = program.flatMap(ExhaustiveProgram.named).map { [$0] } ?? ExhaustiveProgram.catalog
        print("exhaustive exploration: unfenced WRITE reordering \(writeReordering ? "on" : "off"), at most \(runsMax) runs per program")
        var failed: [String] = []
        for program in programs {
            print("\n\(program)")
            let report = exploration.explore(program)
            let state = report.complete ? "all of them" : report.runsMaxReached ? "STOPPED at the run bound" : "ABORTED: \(report.aborted ?? "?")"
            var rows = [
                ("interleavings", "\(report.interleavings) (\(state))"),
                ("choice points", "\(report.choicePoints) (deepest run \(report.deepestRun), at most \(report.mostAlternatives) options)"),
                ("verbs per run", report.verbsPerRun.map { "\($0.lowerBound)-\($0.upperBound)" } ?? "-"),
                ("outcomes", "\(report.outcomes.count)"),
                ("traces", "\(report.traces)"),
                ("wall time", "\(Format.fixed(Double(report.wallNanoseconds) / 1e9, 2)) s"),
                ("violations", report.violatingRuns == 0 ? "none" : "\(report.violatingRuns) runs"),
            ]
            if report.outcomes.count <= 6 {
                // Most runs first, ties by their text: the dictionary's own order changes
                // from one process to the next.
                for (outcome, runs) in report.outcomes.sorted(by: { ($1.value, $0.key) < ($0.value, $1.key) }) { rows.append(("  \(runs) runs", outcome)) }
            }
            print(Format.table(rows.map { ("  " + $0.0, $0.1) }))
            for violation in report.violations {
                print("  VIOLATION \(violation.messages.prefix(5).joined(separator: "; "))")
                print("    replay: finemem explore --exhaustive --program \(program.name) --replay '\(violation.scriptText)'\(writeReordering ? "" : " --no-write-reordering")")
            }
            if report.violatingRuns > 0 || report.aborted != nil { failed.append(program.name) }
        }
        if !failed.isEmpty {
            print("\nprograms with violations: \(failed.joined(separator: " "))")
            throw ExitCode.failure
        }
    }

    /// "0,1,0" as [0, 1, 0]; "" as []; nil for anything else.
    private func parseScript(_ text: String) -> [Int]? {
        if text.isEmpty { return [] }
        var choices: [Int] = []
        for part in text.split(separator: ",", omittingEmptySubsequences: false) {
            guard let choice = Int(String(part.filter { $0 != " " })), choice >= 0 else { return nil }
            choices.append(choice)
        }
        return choices
    }
}
