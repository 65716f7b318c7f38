# One way to declare every gpusock target (after Abseil's absl_cc_library).
#
#   gpusock_library(NAME hostcall SRCS a.cpp b.cu DEPS Threads::Threads)
#     -> static library gpusock_hostcall, alias gpusock::hostcall, public headers in
#        <module>/include. .cu files are CUDA when CUDA is on and C++ otherwise.
#   gpusock_test(NAME hostcall_test SRCS t.cu DEPS gpusock::hostcall)
#   gpusock_binary(NAME demo SRCS main.cu DEPS gpusock::hostcall)

include(CMakeParseArguments)
find_package(Threads REQUIRED)

set(GPUSOCK_WARNINGS -Wall -Wextra -Wno-unused-parameter)

function(_gpusock_cuda_flags out)
  set(flags --extended-lambda --expt-relaxed-constexpr -Xcompiler=-Wall)
  foreach(arch IN LISTS GPUSOCK_CUDA_ARCHS)
    if(arch MATCHES "^([0-9]+[a-z]?)-virtual$")
      list(APPEND flags "-gencode=arch=compute_${CMAKE_MATCH_1},code=compute_${CMAKE_MATCH_1}")
    else()
      list(APPEND flags "-gencode=arch=compute_${arch},code=sm_${arch}")
    endif()
  endforeach()
  set(${out} ${flags} PARENT_SCOPE)
endfunction()

# Marks sources: .cu files are compiled by nvcc when CUDA is on, as plain C++ otherwise.
function(_gpusock_sources target)
  get_target_property(srcs ${target} SOURCES)
  foreach(src IN LISTS srcs)
    if(src MATCHES "\\.cu$")
      if(GPUSOCK_ENABLE_CUDA)
        _gpusock_cuda_flags(cf)
        set_source_files_properties(${src} TARGET_DIRECTORY ${target} PROPERTIES COMPILE_OPTIONS "${cf}")
      else()
        set_source_files_properties(${src} TARGET_DIRECTORY ${target} PROPERTIES LANGUAGE CXX COMPILE_OPTIONS "-xc++")
      endif()
    endif()
  endforeach()
  target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:${GPUSOCK_WARNINGS}>)
  if(GPUSOCK_ENABLE_CUDA)
    set_target_properties(${target} PROPERTIES CUDA_RUNTIME_LIBRARY Static)
  endif()
endfunction()

function(gpusock_library)
  cmake_parse_arguments(A "" "NAME" "SRCS;DEPS;PUBLIC_DEFINES" ${ARGN})
  add_library(gpusock_${A_NAME} STATIC ${A_SRCS})
  add_library(gpusock::${A_NAME} ALIAS gpusock_${A_NAME})
  target_include_directories(gpusock_${A_NAME} PUBLIC ${CMAKE_CURRENT_SOURCE_DIR}/include)
  target_link_libraries(gpusock_${A_NAME} PUBLIC ${A_DEPS})
  target_compile_definitions(gpusock_${A_NAME} PUBLIC ${A_PUBLIC_DEFINES})
  _gpusock_sources(gpusock_${A_NAME})
endfunction()

function(gpusock_binary)
  cmake_parse_arguments(A "" "NAME" "SRCS;DEPS" ${ARGN})
  add_executable(${A_NAME} ${A_SRCS})
  target_link_libraries(${A_NAME} PRIVATE ${A_DEPS})
  _gpusock_sources(${A_NAME})
endfunction()

# A GoogleTest binary; every TEST in it becomes a ctest test (discovered when ctest runs,
# so building never needs a GPU). LABELS tag the tests (e.g. "gpu").
function(gpusock_test)
  cmake_parse_arguments(A "" "NAME;TIMEOUT" "SRCS;DEPS;LABELS" ${ARGN})
  if(NOT A_TIMEOUT)
    set(A_TIMEOUT 600)
  endif()
  gpusock_binary(NAME ${A_NAME} SRCS ${A_SRCS} DEPS ${A_DEPS} GTest::gtest GTest::gtest_main GTest::gmock)
  include(GoogleTest)
  gtest_discover_tests(${A_NAME} DISCOVERY_MODE PRE_TEST DISCOVERY_TIMEOUT 60 NO_PRETTY_VALUES
                       PROPERTIES TIMEOUT ${A_TIMEOUT} LABELS "${A_LABELS}")
endfunction()

# checkheaders: every public header of `module` compiles on its own, as C++ (g++) and,
# with CUDA on, as CUDA (nvcc). Part of the default build.
function(gpusock_check_headers module)
  file(GLOB_RECURSE headers RELATIVE ${CMAKE_CURRENT_SOURCE_DIR}/include
       ${CMAKE_CURRENT_SOURCE_DIR}/include/*.hpp)
  set(srcs "")
  foreach(h IN LISTS headers)
    string(MAKE_C_IDENTIFIER ${h} id)
    set(cpp ${CMAKE_CURRENT_BINARY_DIR}/checkheaders/${id}.cpp)
    file(CONFIGURE OUTPUT ${cpp} CONTENT "#include \"${h}\"\n")
    list(APPEND srcs ${cpp})
    if(GPUSOCK_ENABLE_CUDA)
      set(cu ${CMAKE_CURRENT_BINARY_DIR}/checkheaders/${id}.cu)
      file(CONFIGURE OUTPUT ${cu} CONTENT "#include \"${h}\"\n")
      list(APPEND srcs ${cu})
    endif()
  endforeach()
  add_library(gpusock_${module}_checkheaders OBJECT ${srcs})
  target_link_libraries(gpusock_${module}_checkheaders PRIVATE gpusock::${module})
  _gpusock_sources(gpusock_${module}_checkheaders)
endfunction()
