// benchmarks/peak_memory.hpp — the resident-memory probes every benchmark file's peak-memory mode uses.
//
// A case's peak extra memory is measured in a fresh child process: it builds its inputs, calls
// reset_peak() (which restarts the kernel's resident high-water mark VmHWM at the current resident
// set, so the set-up's own temporaries are not counted), runs the case once and reports
// peak_bytes() minus what reset_peak() returned. Linux only (/proc), kernel >= 4.0 for clear_refs "5".
#pragma once

#include <unistd.h>

#include <cstdio>

namespace posttrain_bench {

/// Resident set now, in bytes (/proc/self/statm's second field times the page size).
inline long resident_bytes() {
  long pages = 0, resident = 0;
  if (FILE* f = std::fopen("/proc/self/statm", "r")) {
    if (std::fscanf(f, "%ld %ld", &pages, &resident) != 2) resident = 0;
    std::fclose(f);
  }
  return resident * sysconf(_SC_PAGESIZE);
}

/// Resident high-water mark (VmHWM of /proc/self/status) in bytes; -1024 when unreadable.
inline long peak_bytes() {
  long kib = -1;
  if (FILE* f = std::fopen("/proc/self/status", "r")) {
    char line[256];
    while (std::fgets(line, sizeof line, f))
      if (std::sscanf(line, "VmHWM: %ld kB", &kib) == 1) break;
    std::fclose(f);
  }
  return kib * 1024L;
}

/// Restarts VmHWM at the current resident set and returns that resident set in bytes.
inline long reset_peak() {
  if (FILE* f = std::fopen("/proc/self/clear_refs", "w")) {
    std::fputs("5", f);
    std::fclose(f);
  }
  return resident_bytes();
}

}  // namespace posttrain_bench
