# Runs posttrain-verify with ARGS (a ;-list) and checks its exit status (EXPECT_STATUS) and that its stdout+stderr
# match EXPECT_REGEX. Used by the "verify: ..." ctest tests (tools/CMakeLists.txt).
execute_process(COMMAND ${TOOL} ${ARGS} RESULT_VARIABLE status OUTPUT_VARIABLE out ERROR_VARIABLE err)
set(all "${out}${err}")
if(NOT status STREQUAL EXPECT_STATUS)
  message(FATAL_ERROR "posttrain-verify ${ARGS}\nexited with ${status}, expected ${EXPECT_STATUS}; it printed:\n${all}")
endif()
if(NOT all MATCHES "${EXPECT_REGEX}")
  message(FATAL_ERROR "posttrain-verify ${ARGS}\nprinted no match for '${EXPECT_REGEX}':\n${all}")
endif()
if(status EQUAL 2)
  # a malformed input is one line on stderr, nothing on stdout
  string(REGEX MATCHALL "\n" newlines "${err}")
  list(LENGTH newlines lines)
  if(NOT lines EQUAL 1 OR NOT out STREQUAL "")
    message(FATAL_ERROR "posttrain-verify ${ARGS}\nexit status 2 must come with one line on stderr; got stdout:\n${out}\nstderr:\n${err}")
  endif()
endif()
message(STATUS "posttrain-verify ${ARGS}: exit ${status} as expected\n${all}")
