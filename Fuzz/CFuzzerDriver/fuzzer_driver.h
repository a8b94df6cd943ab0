#ifndef FINEMEM_FUZZER_DRIVER_H
#define FINEMEM_FUZZER_DRIVER_H

#include <stddef.h>
#include <stdint.h>

// libFuzzer's entry point when the program has its own main (SwiftPM links executables
// with --defsym main=<Module>_main, which replaces libFuzzer's main). Linked only in
// builds with -sanitize=fuzzer.
int LLVMFuzzerRunDriver(int *argc, char ***argv, int (*callback)(const uint8_t *data, size_t size));

#endif
