/* The one header charmrs-pmix-sys generates bindings for. */
#include <pmix.h>
