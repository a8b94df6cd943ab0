import Testing
@testable import FineMem

@Suite struct ZZDebugProbe {
    @Test func probe() {
        Simulator.debugTraceVerbsFlag = true
        let run = ExhaustiveExploration().run(.smallPairOneSpan, script: [])
        Simulator.debugTraceVerbsFlag = false
        print("choices", run.choicePoints, run.outcome, run.violations)
    }
}
