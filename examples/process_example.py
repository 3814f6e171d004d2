from procpool import Process
import random
import os
from random import randint


def squared(x):
   module_name = __name__
   parent_id = os.getppid()
   process_id = os.getpid()

   result = x * x

   print(f'module={module_name} : parent={parent_id} : process={process_id} : result={result}')


if __name__ == '__main__':
   # generate 1,000 random numbers in the range [0, 100]
   numbers = [random.randint(0, 100) for _ in range(1000)]

   # create a list of Process
   processes = [Process(target=squared, args=(num,)) for num in numbers]

   # start each Process
   for process in processes:
      process.start()

   # join each Process
   for process in processes:
      process.join()
