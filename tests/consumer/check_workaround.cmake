# Included by both consumer projects after posttrain is found / added.
# The opt-in workaround for GCC 12's AVX-512 wrong-code bug: defined for every compiler, holding the
# option exactly where the compiler is GCC 12 on x86 (cmake/posttrainGcc12Avx512.cmake).
if(NOT TARGET posttrain::gcc12_avx512_workaround)
  message(FATAL_ERROR "posttrain did not provide posttrain::gcc12_avx512_workaround")
endif()
get_target_property(workaround_options posttrain::gcc12_avx512_workaround INTERFACE_COMPILE_OPTIONS)
if(CMAKE_CXX_COMPILER_ID STREQUAL "GNU" AND CMAKE_CXX_COMPILER_VERSION MATCHES "^12\\."
   AND CMAKE_SYSTEM_PROCESSOR MATCHES "^(x86_64|AMD64)$"
   AND NOT workaround_options STREQUAL "-mtune-ctrl=^inter_unit_moves_to_vec")
  message(FATAL_ERROR "posttrain::gcc12_avx512_workaround holds '${workaround_options}' under GCC 12 on x86")
endif()
