// The layout fuzz target. Built for fuzzing (see README, "Fuzzing"), it hands its
// inputs to libFuzzer's driver; built normally, it replays the input files named on the
// command line (for example a crash file libFuzzer saved), so a finding can be rerun in
// an ordinary debug build.
import FuzzTargets

#if FUZZING
import CFuzzerDriver
import Glibc

var argc = CommandLine.argc
var argv: UnsafeMutablePointer<UnsafeMutablePointer<CChar>?>? = CommandLine.unsafeArgv
exit(LLVMFuzzerRunDriver(&argc, &argv) { data, size in
    fuzzLayout(Array(UnsafeBufferPointer(start: data, count: size)))
    return 0
})
#else
import Foundation

let paths = CommandLine.arguments.dropFirst()
if paths.isEmpty {
    print("usage: fuzz-layout FILE... (replays inputs; build with -DFUZZING to fuzz)")
}
for path in paths {
    guard let data = FileManager.default.contents(atPath: path) else {
        print("cannot read \(path)")
        exit(1)
    }
    fuzzLayout([UInt8](data))
    print("\(path): ok")
}
#endif
