/* The header compiles standalone, twice in one translation unit, as C11 and as C++17. */
#include "ember.h"
#include "ember.h"

int main(void) {
  ember_session_params p;
  EMBER_SESSION_PARAMS_DEFAULT(&p);
  return ember_abi_version() == EMBER_ABI_VERSION && p.struct_size == sizeof p ? 0 : 1;
}
