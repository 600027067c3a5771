// The feedback page served at "/": one self-contained HTML document (no external scripts or styles),
// compiled into the binary so nothing is read from the source tree at run time.
#pragma once
#include <string_view>

namespace moerl::feedback {

std::string_view page_html();

}  // namespace moerl::feedback
