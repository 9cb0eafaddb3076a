# posttrain_gcc12_avx512_flags(<out-var>): the compile options that avoid a GCC 12 x86 back-end
# wrong-code bug, or nothing where the compiler is not GCC 12 on x86 (or does not take the option).
#
# The bug: with AVX-512 enabled (-mavx512f, hence -march=native on an AVX-512 machine), GCC 12.2
# expands a 32- or 64-byte constant store whose top 8-byte words are zero, e.g.
#   void f(double* p) { const double v[4] = {1, 1, 1, 0}; std::memcpy(p, v, 32); }
# as a vpbroadcastq of its first word, storing 1 1 1 1 ({1, 2, 3, 4} and {2, 2, 2, 5} are stored
# right). This fits the x86 back end's conversion of a wide integer constant into a broadcast
# (ix86_convert_const_wide_int_to_broadcast) comparing only the words the constant holds
# explicitly, trailing zero words being implicit; newer GCC sources check the word count there.
# The conversion runs only when the tuning allows moves from general to vector registers, so
# -mtune-ctrl=^inter_unit_moves_to_vec turns it off (other code changes only in that such moves go
# through memory). Seen on GCC 12.2 (Debian 12.2.0-14); applied to every GCC 12.x, harmless where
# the bug is absent. GCC 13 and later were not tested here (the option is not applied there).
#
# Used by posttrain's own targets (CMakeLists.txt) and offered to consumers as the opt-in INTERFACE
# target posttrain::gcc12_avx512_workaround (defined here at the consumer's configure time, since
# the answer depends on the consumer's compiler, not on the one posttrain was installed with).
include_guard(GLOBAL)
include(CheckCXXCompilerFlag)

function(posttrain_gcc12_avx512_flags out_var)
  set(flags "")
  get_property(languages GLOBAL PROPERTY ENABLED_LANGUAGES)
  if("CXX" IN_LIST languages
     AND CMAKE_CXX_COMPILER_ID STREQUAL "GNU"
     AND CMAKE_CXX_COMPILER_VERSION VERSION_GREATER_EQUAL 12
     AND CMAKE_CXX_COMPILER_VERSION VERSION_LESS 13
     AND CMAKE_SYSTEM_PROCESSOR MATCHES "^(x86_64|AMD64|amd64|i[3-6]86)$")
    check_cxx_compiler_flag("-mtune-ctrl=^inter_unit_moves_to_vec" POSTTRAIN_CXX_HAS_MTUNE_CTRL_INTER_UNIT)
    if(POSTTRAIN_CXX_HAS_MTUNE_CTRL_INTER_UNIT)
      set(flags "-mtune-ctrl=^inter_unit_moves_to_vec")
    endif()
  endif()
  set(${out_var} "${flags}" PARENT_SCOPE)
endfunction()

# posttrain_add_gcc12_avx512_workaround(<target> <INTERFACE|IMPORTED>): creates the INTERFACE
# target carrying those options (empty where they do not apply).
function(posttrain_add_gcc12_avx512_workaround target kind)
  if(TARGET ${target})
    return()
  endif()
  posttrain_gcc12_avx512_flags(flags)
  if(kind STREQUAL "IMPORTED")
    add_library(${target} INTERFACE IMPORTED)
  else()
    add_library(${target} INTERFACE)
  endif()
  if(flags)
    set_property(TARGET ${target} PROPERTY INTERFACE_COMPILE_OPTIONS "${flags}")
  endif()
endfunction()
