# Drives a consumer project end to end: cmake -P run_consumer.cmake with
#   MODE=install       install posttrain's build tree into a prefix, build and run the
#                      find_package consumer, and check that an unknown component fails;
#   MODE=subdirectory  build and run the add_subdirectory consumer;
#   MODE=bare          configure and install posttrain itself without Catch2 / Google Benchmark.
# Other variables: SOURCE_DIR (posttrain's), BINARY_DIR (posttrain's build), WORK_DIR (scratch),
# WITH_TORCH, GENERATOR, CXX_COMPILER, BUILD_TYPE, PREFIX_PATH ("|"-separated, may be empty),
# EIGEN3_DIR and TORCH_DIR (where posttrain's own build found them, may be empty).
cmake_minimum_required(VERSION 3.25)

function(step what)
  execute_process(COMMAND ${ARGN} RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(NOT rc EQUAL 0)
    message(FATAL_ERROR "consumer test: ${what} failed (${rc}):\n${out}\n${err}")
  endif()
  message(STATUS "consumer test: ${what}: ok")
  set(last_output "${out}" PARENT_SCOPE)
  set(last_error "${err}" PARENT_SCOPE)
endfunction()

set(here ${CMAKE_CURRENT_LIST_DIR})
file(REMOVE_RECURSE ${WORK_DIR})
set(configure_args -G ${GENERATOR} -DCMAKE_CXX_COMPILER=${CXX_COMPILER} -DCMAKE_BUILD_TYPE=${BUILD_TYPE})
foreach(dep Eigen3 Torch)
  string(TOUPPER ${dep} upper)
  if(${upper}_DIR)
    list(APPEND configure_args -D${dep}_DIR=${${upper}_DIR})
  endif()
endforeach()
string(REPLACE "|" ";" PREFIX_PATH "${PREFIX_PATH}")

if(MODE STREQUAL "install")
  set(prefix ${WORK_DIR}/prefix)
  step("cmake --install into ${prefix}" ${CMAKE_COMMAND} --install ${BINARY_DIR} --prefix ${prefix})
  foreach(file include/posttrain/posttrain.hpp include/posttrain/backends/eigen.hpp
               share/cmake/posttrain/posttrainConfig.cmake share/cmake/posttrain/posttrainConfigVersion.cmake)
    if(NOT EXISTS ${prefix}/${file})
      message(FATAL_ERROR "consumer test: the install tree lacks ${file}")
    endif()
  endforeach()
  set(search "${prefix};${PREFIX_PATH}")
  step("configure the find_package consumer (torch: ${WITH_TORCH})"
       ${CMAKE_COMMAND} -S ${here}/installed -B ${WORK_DIR}/installed ${configure_args}
       "-DCMAKE_PREFIX_PATH=${search}" -DCONSUMER_WITH_TORCH=${WITH_TORCH})
  # Two jobs: the two strict torch programs are the slowest compiles of the whole ctest run.
  step("build it" ${CMAKE_COMMAND} --build ${WORK_DIR}/installed --parallel 2)
  step("run the eigen consumer" ${WORK_DIR}/installed/eigen_consumer)
  message(STATUS "${last_output}")
  if(WITH_TORCH)
    foreach(level O3 O2)
      step("run the torch consumer (strict, -${level})" ${WORK_DIR}/installed/torch_consumer_${level})
      message(STATUS "${last_output}")
    endforeach()
  endif()

  # An unknown component must make find_package(... REQUIRED) fail, saying which one.
  execute_process(COMMAND ${CMAKE_COMMAND} -S ${here}/unknown_component -B ${WORK_DIR}/unknown ${configure_args}
                          "-DCMAKE_PREFIX_PATH=${search}"
                  RESULT_VARIABLE rc OUTPUT_VARIABLE out ERROR_VARIABLE err)
  if(rc EQUAL 0 OR NOT "${out}${err}" MATCHES "component 'no_such_backend' was not installed")
    message(FATAL_ERROR "consumer test: find_package with an unknown component should fail naming it (rc ${rc}):\n${out}\n${err}")
  endif()
  message(STATUS "consumer test: an unknown component fails find_package: ok")
elseif(MODE STREQUAL "subdirectory")
  step("configure the add_subdirectory consumer"
       ${CMAKE_COMMAND} -S ${here}/subdirectory -B ${WORK_DIR}/subdirectory ${configure_args}
       -DPOSTTRAIN_SOURCE_DIR=${SOURCE_DIR} -DPOSTTRAIN_WITH_TORCH=OFF "-DCMAKE_PREFIX_PATH=${PREFIX_PATH}")
  step("build it" ${CMAKE_COMMAND} --build ${WORK_DIR}/subdirectory)
  step("run it" ${WORK_DIR}/subdirectory/eigen_consumer)
  message(STATUS "${last_output}")
elseif(MODE STREQUAL "bare")
  # A user's `cmake -S posttrain -B build && cmake --install build` on a machine without the test and
  # benchmark dependencies (Catch2, Google Benchmark hidden from find_package): configure succeeds,
  # says what it skipped, and the install works.
  step("configure posttrain without Catch2 and Google Benchmark"
       ${CMAKE_COMMAND} -S ${SOURCE_DIR} -B ${WORK_DIR}/build ${configure_args} "-DCMAKE_PREFIX_PATH=${PREFIX_PATH}"
       -DCMAKE_DISABLE_FIND_PACKAGE_Catch2=ON -DCMAKE_DISABLE_FIND_PACKAGE_benchmark=ON
       -DPOSTTRAIN_BUILD_BENCHMARKS=ON)
  foreach(expected "SKIPPING posttrain's tests" "SKIPPING the benchmarks")
    string(FIND "${last_output}${last_error}" "${expected}" at)
    if(at EQUAL -1)
      message(FATAL_ERROR "consumer test: configure without test dependencies did not say '${expected}':\n${last_output}\n${last_error}")
    endif()
    message(STATUS "consumer test: configure says '${expected}': ok")
  endforeach()
  step("cmake --install it" ${CMAKE_COMMAND} --install ${WORK_DIR}/build --prefix ${WORK_DIR}/prefix)
  if(NOT EXISTS ${WORK_DIR}/prefix/share/cmake/posttrain/posttrainConfig.cmake)
    message(FATAL_ERROR "consumer test: the install without test dependencies lacks posttrainConfig.cmake")
  endif()
else()
  message(FATAL_ERROR "MODE must be install, subdirectory or bare, got '${MODE}'")
endif()
