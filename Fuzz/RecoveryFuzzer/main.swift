// The recovery fuzz target (see FuzzTargets.recoveryFindings for the input format).
import FuzzTargets

runFuzzer(name: "fuzz-recovery", fuzzRecovery)
